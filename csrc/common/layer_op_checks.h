// Argument checks of the model-layer ops that have a CPU implementation and a kernel one
// (rms_norm, add_rms_norm, qk_norm_rotary(_write_kv), swiglu, moe_route, moe_dispatch,
// moe_combine, step_tables, block_attention), shared by csrc/cpu/ and the kernel bindings
// (csrc/cuda/bindings/). They guard what the kernels rely on (dtypes, shapes, contiguous rows,
// one device); the Python wrappers in dmax_ext.ops check the same things first.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <utility>

namespace dmax::checks {

inline void check_float_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op, ": ", name,
              " must be float32, bfloat16 or float16, got ", dtype);
}

// t must have x's dtype, the given sizes and x's device.
inline void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                       at::IntArrayRef sizes) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.sizes() == sizes, op, ": ", name,
              " must be ", x.scalar_type(), " ", sizes, ", got ", t.scalar_type(), " ",
              t.sizes());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on ", x.device(),
              " like the other inputs, got ", t.device());
}

inline void check_rms_norm_args(const at::Tensor& x, const at::Tensor& weight) {
  check_float_dtype("rms_norm", "x", x);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0 && x.stride(-1) == 1,
              "rms_norm: x must have a contiguous, non-empty last dimension, got sizes ",
              x.sizes(), " strides ", x.strides());
  check_like("rms_norm", "weight", weight, x, {x.size(-1)});
}

inline void check_add_rms_norm_args(const at::Tensor& x, const at::Tensor& update,
                                    const at::Tensor& weight) {
  check_float_dtype("add_rms_norm", "x", x);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0 && x.stride(-1) == 1,
              "add_rms_norm: x must have a contiguous, non-empty last dimension, got sizes ",
              x.sizes(), " strides ", x.strides());
  check_like("add_rms_norm", "update", update, x, x.sizes());
  check_like("add_rms_norm", "weight", weight, x, {x.size(-1)});
}

inline void check_qk_norm_rotary_args(const at::Tensor& qk, const at::Tensor& q_weight,
                                      const at::Tensor& k_weight, const at::Tensor& cos,
                                      const at::Tensor& sin, int64_t n_q_heads) {
  check_float_dtype("qk_norm_rotary", "qk", qk);
  TORCH_CHECK(qk.dim() == 4 && qk.size(3) > 0 && qk.stride(3) == 1,
              "qk_norm_rotary: qk must be [B, L, heads, D] with contiguous rows, got sizes ",
              qk.sizes(), " strides ", qk.strides());
  const int64_t D = qk.size(3);
  TORCH_CHECK(n_q_heads >= 0 && n_q_heads <= qk.size(2), "qk_norm_rotary: n_q_heads must be in "
              "[0, ", qk.size(2), "], got ", n_q_heads);
  check_like("qk_norm_rotary", "q_weight", q_weight, qk, {D});
  check_like("qk_norm_rotary", "k_weight", k_weight, qk, {D});
  TORCH_CHECK(cos.dim() == 3 && cos.size(2) % 2 == 0 && cos.size(2) <= D,
              "qk_norm_rotary: cos must be [B, L, R] with R even and <= ", D, ", got ",
              cos.sizes());
  check_like("qk_norm_rotary", "cos", cos, qk, {qk.size(0), qk.size(1), cos.size(2)});
  check_like("qk_norm_rotary", "sin", sin, qk, cos.sizes());
}

// qkv [B, L, n_q + 2 n_kv, D]: the qkv projection's query, key and value heads; keys / values
// [B, n_kv, S, D] the cache (the same strides, D contiguous); slots int64 [L].
inline void check_qk_norm_rotary_write_kv_args(const at::Tensor& qkv, const at::Tensor& q_weight,
                                               const at::Tensor& k_weight, const at::Tensor& cos,
                                               const at::Tensor& sin, int64_t n_q_heads,
                                               const at::Tensor& keys, const at::Tensor& values,
                                               const at::Tensor& slots) {
  TORCH_CHECK(keys.dim() == 4 && qkv.dim() == 4, "qk_norm_rotary_write_kv: qkv [B, L, heads, D] "
              "and keys [B, n_kv, S, D] expected, got ", qkv.sizes(), " and ", keys.sizes());
  const int64_t n_kv = keys.size(1);
  TORCH_CHECK(n_q_heads >= 0 && qkv.size(2) == n_q_heads + 2 * n_kv,
              "qk_norm_rotary_write_kv: qkv must hold n_q_heads + 2 n_kv = ", n_q_heads,
              " + 2 x ", n_kv, " heads (n_kv from keys), got ", qkv.size(2));
  check_qk_norm_rotary_args(qkv.narrow(2, 0, n_q_heads + n_kv), q_weight, k_weight, cos, sin,
                            n_q_heads);
  check_like("qk_norm_rotary_write_kv", "keys", keys, qkv,
             {qkv.size(0), n_kv, keys.size(2), qkv.size(3)});
  TORCH_CHECK(keys.stride(3) == 1, "qk_norm_rotary_write_kv: keys must have a contiguous last "
              "dimension, got strides ", keys.strides());
  check_like("qk_norm_rotary_write_kv", "values", values, qkv, keys.sizes());
  TORCH_CHECK(values.strides() == keys.strides(), "qk_norm_rotary_write_kv: values must have "
              "keys' strides ", keys.strides(), ", got ", values.strides());
  TORCH_CHECK(slots.dim() == 1 && slots.scalar_type() == at::kLong && slots.size(0) == qkv.size(1),
              "qk_norm_rotary_write_kv: slots must be int64 [", qkv.size(1), "], got ",
              slots.scalar_type(), " ", slots.sizes());
  TORCH_CHECK(slots.device() == qkv.device(), "qk_norm_rotary_write_kv: slots must be on ",
              qkv.device(), " like qkv, got ", slots.device());
}

// step_tables: positions [B, T] int64, inv_freq [R/2] float32, valid_from [B] int64, write_slot
// one int64 (on the device: its value is checked by the CPU op and the Python wrapper), one
// device; a float dtype for cos / sin.
inline void check_step_tables_args(const at::Tensor& positions, const at::Tensor& inv_freq,
                                   const at::Tensor& valid_from, const at::Tensor& write_slot,
                                   int64_t span, int64_t block_length, at::ScalarType dtype) {
  TORCH_CHECK(positions.dim() == 2 && positions.scalar_type() == at::kLong,
              "step_tables: position_ids must be int64 [B, T], got ", positions.scalar_type(),
              " ", positions.sizes());
  TORCH_CHECK(inv_freq.dim() == 1 && inv_freq.scalar_type() == at::kFloat,
              "step_tables: inv_freq must be float32 [R/2], got ", inv_freq.scalar_type(), " ",
              inv_freq.sizes());
  TORCH_CHECK(valid_from.scalar_type() == at::kLong &&
                  valid_from.sizes() == at::IntArrayRef{positions.size(0)},
              "step_tables: valid_from must be int64 [", positions.size(0), "], got ",
              valid_from.scalar_type(), " ", valid_from.sizes());
  TORCH_CHECK(write_slot.scalar_type() == at::kLong && write_slot.numel() == 1,
              "step_tables: write_slot must be one int64, got ", write_slot.scalar_type(), " ",
              write_slot.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"inv_freq", &inv_freq},
                                {"valid_from", &valid_from}, {"write_slot", &write_slot}}) {
    TORCH_CHECK(t->device() == positions.device(), "step_tables: ", name, " must be on ",
                positions.device(), " like position_ids, got ", t->device());
  }
  TORCH_CHECK(span >= 1 && block_length >= 1, "step_tables: span and block_length must be >= 1, "
              "got ", span, " and ", block_length);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "step_tables: dtype must be float32, bfloat16 or float16, got ", dtype);
}

inline void check_swiglu_args(const at::Tensor& gate_up) {
  check_float_dtype("swiglu", "gate_up", gate_up);
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0,
              "swiglu: gate_up must be [..., 2I] (gate then up), got ", gate_up.sizes());
}

// The router's sizes must make groups of at least 2 experts (the top-2 sums) and leave at least
// top_k experts in the kept groups.
inline void check_moe_route_args(const at::Tensor& logits, const at::Tensor& bias, int64_t n_group,
                                 int64_t topk_group, int64_t top_k) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat,
              "moe_route: logits must be float32 [N, E], got ", logits.scalar_type(), " ",
              logits.sizes());
  const int64_t E = logits.size(1);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == E && bias.scalar_type() == at::kFloat,
              "moe_route: expert_bias must be float32 [", E, "], got ", bias.scalar_type(), " ",
              bias.sizes());
  TORCH_CHECK(bias.device() == logits.device(), "moe_route: expert_bias must be on ",
              logits.device(), " like logits, got ", bias.device());
  TORCH_CHECK(n_group >= 1 && E % n_group == 0 && E / n_group >= 2,
              "moe_route: n_group must divide E = ", E, " into groups of at least 2, got ",
              n_group);
  TORCH_CHECK(topk_group >= 1 && topk_group <= n_group, "moe_route: topk_group must be in [1, ",
              n_group, "], got ", topk_group);
  TORCH_CHECK(top_k >= 1 && top_k <= topk_group * (E / n_group),
              "moe_route: top_k must be in [1, ", topk_group * (E / n_group),
              "] (the kept groups' experts), got ", top_k);
}

// ids: the router's [N, k] int64 choices of n_experts experts (values checked by the CPU op and
// the Python wrapper: reading them on a GPU would be a sync).
inline void check_moe_dispatch_args(const at::Tensor& ids, int64_t n_experts) {
  TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == at::kLong,
              "moe_dispatch: ids must be int64 [N, k], got ", ids.scalar_type(), " ", ids.sizes());
  TORCH_CHECK(n_experts >= 1, "moe_dispatch: n_experts must be >= 1, got ", n_experts);
}

inline void check_moe_combine_args(const at::Tensor& sorted_out, const at::Tensor& inverse,
                                   const at::Tensor& weights,
                                   const std::optional<at::Tensor>& addend,
                                   const std::optional<at::Tensor>& residual) {
  check_float_dtype("moe_combine", "sorted_out", sorted_out);
  TORCH_CHECK(sorted_out.dim() == 2, "moe_combine: sorted_out must be [N * k, H], got ",
              sorted_out.sizes());
  TORCH_CHECK(weights.dim() == 2 && weights.scalar_type() == at::kFloat,
              "moe_combine: weights must be float32 [N, k], got ", weights.scalar_type(), " ",
              weights.sizes());
  TORCH_CHECK(weights.numel() == sorted_out.size(0), "moe_combine: weights [N, k] must have one "
              "entry per row of sorted_out (", sorted_out.size(0), "), got ", weights.sizes());
  TORCH_CHECK(inverse.dim() == 1 && inverse.scalar_type() == at::kLong &&
                  inverse.size(0) == sorted_out.size(0),
              "moe_combine: inverse must be int64 [", sorted_out.size(0), "], got ",
              inverse.scalar_type(), " ", inverse.sizes());
  TORCH_CHECK(inverse.device() == sorted_out.device() && weights.device() == sorted_out.device(),
              "moe_combine: inverse and weights must be on ", sorted_out.device(),
              " like sorted_out, got ", inverse.device(), " and ", weights.device());
  if (addend.has_value()) {
    check_like("moe_combine", "addend", *addend, sorted_out,
               {weights.size(0), sorted_out.size(1)});
  }
  if (residual.has_value()) {
    check_like("moe_combine", "residual", *residual, sorted_out,
               {weights.size(0), sorted_out.size(1)});
  }
}

// q [B, heads, T, D], keys / values [B, kv_heads, S, D] (rows of D contiguous), mask bool
// [B or 1, 1, T, S], all on q's device.
inline void check_block_attention_args(const at::Tensor& q, const at::Tensor& keys,
                                       const at::Tensor& values, const at::Tensor& mask) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "block_attention: q must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(q.dim() == 4 && q.size(3) > 0 && q.stride(3) == 1,
              "block_attention: q must be [B, heads, T, D] with contiguous rows, got sizes ",
              q.sizes(), " strides ", q.strides());
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"keys", keys},
                                {"values", values}}) {
    TORCH_CHECK(t.scalar_type() == dtype, "block_attention: ", name, " must be ", dtype,
                " like q, got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 4 && t.size(0) == B && t.size(3) == D && t.stride(3) == 1,
                "block_attention: ", name, " must be [", B, ", kv_heads, S, ", D,
                "] with contiguous rows, got sizes ", t.sizes(), " strides ", t.strides());
  }
  TORCH_CHECK(values.sizes() == keys.sizes(), "block_attention: values must have keys' sizes ",
              keys.sizes(), ", got ", values.sizes());
  const int64_t KV = keys.size(1), S = keys.size(2);
  TORCH_CHECK(KV > 0 && H % KV == 0, "block_attention: the query heads (", H,
              ") must be a multiple of the key-value heads (", KV, ")");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 4 &&
                  (mask.size(0) == B || mask.size(0) == 1) && mask.size(1) == 1 &&
                  mask.size(2) == T && mask.size(3) == S,
              "block_attention: mask must be bool [", B, " or 1, 1, ", T, ", ", S, "], got ",
              mask.scalar_type(), " ", mask.sizes());
  for (const auto* t : {&keys, &values, &mask}) {
    TORCH_CHECK(t->device() == q.device(), "block_attention: keys, values and mask must be on ",
                q.device(), " like q, got ", t->device());
  }
}

}  // namespace dmax::checks
