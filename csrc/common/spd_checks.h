// Argument checks of the SPD-step ops (promote, spd_update, hybrid_embed), shared by the CPU
// implementations (csrc/cpu/) and the kernel bindings (csrc/cuda/bindings/). They guard what the
// kernels rely on (dtypes, shapes, one device, a readable mask row); the Python wrappers in
// dmax_ext.ops check the same things first, plus the values of the ids.
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace dmax::checks {

constexpr int64_t kMaxTopK = 8;

inline void check_arg(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype,
                      at::IntArrayRef shape, const at::Device& device) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device,
              " like the other inputs, got ", t.device());
}

inline void check_unit_interval(double value, const char* op, const char* name) {
  TORCH_CHECK(value >= 0.0 && value <= 1.0, op, ": ", name, " must be in [0, 1], got ", value);
}

inline void check_promote_args(const at::Tensor& ids, const at::Tensor& conf, const at::Tensor& pred,
                               double threshold) {
  TORCH_CHECK(ids.dim() == 2, "promote: ids must be [B, L], got ", ids.sizes());
  check_arg(ids, "promote", "ids", at::kLong, ids.sizes(), ids.device());
  check_arg(conf, "promote", "conf", at::kFloat, ids.sizes(), ids.device());
  check_arg(pred, "promote", "pred", at::kLong, ids.sizes(), ids.device());
  check_unit_interval(threshold, "promote", "threshold");
}

inline void check_spd_update_args(const at::Tensor& ids, const at::Tensor& active,
                                  const at::Tensor& promoted, const at::Tensor& pred,
                                  const at::Tensor& conf, double accept_threshold) {
  TORCH_CHECK(ids.dim() == 2, "spd_update: ids must be [B, L], got ", ids.sizes());
  check_arg(ids, "spd_update", "ids", at::kLong, ids.sizes(), ids.device());
  check_arg(active, "spd_update", "active", at::kBool, ids.sizes(), ids.device());
  check_arg(promoted, "spd_update", "promoted", at::kBool, ids.sizes(), ids.device());
  check_arg(pred, "spd_update", "pred", at::kLong, ids.sizes(), ids.device());
  check_arg(conf, "spd_update", "conf", at::kFloat, ids.sizes(), ids.device());
  check_unit_interval(accept_threshold, "spd_update", "accept_threshold");
}

// topk_ids int64 / topk_probs float32 [B, L, k] with k in 1..kMaxTopK (logits_stats' outputs).
inline int64_t check_topk_args(const at::Tensor& topk_ids, const at::Tensor& topk_probs,
                               const char* op, int64_t B, int64_t L, const at::Device& device) {
  TORCH_CHECK(topk_ids.dim() == 3, op, ": topk_ids must be [B, L, k], got ", topk_ids.sizes());
  const int64_t k = topk_ids.size(2);
  TORCH_CHECK(k >= 1 && k <= kMaxTopK, op, ": k (last dim of topk_ids) must be in 1..", kMaxTopK,
              ", got ", k);
  check_arg(topk_ids, op, "topk_ids", at::kLong, {B, L, k}, device);
  check_arg(topk_probs, op, "topk_probs", at::kFloat, {B, L, k}, device);
  return k;
}

// embeds and weight may be strided views as long as their last dimension is contiguous (the op
// writes embeds in place, so it cannot make a contiguous copy of it).
inline void check_hybrid_embed_args(const at::Tensor& embeds, const at::Tensor& weight,
                                    const at::Tensor& ids, const at::Tensor& active,
                                    const at::Tensor& changed, const at::Tensor& topk_ids,
                                    const at::Tensor& topk_probs, int64_t mask_id) {
  const char* op = "hybrid_embed";
  TORCH_CHECK(embeds.dim() == 3, op, ": embeds must be [B, L, H], got ", embeds.sizes());
  const auto dtype = embeds.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": embeds must be float32, float16 or bfloat16, got ", dtype);
  const int64_t B = embeds.size(0), L = embeds.size(1), H = embeds.size(2);
  const auto device = embeds.device();
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == H, op, ": weight must be [V, ", H,
              "] (H of embeds), got ", weight.sizes());
  check_arg(weight, op, "weight", dtype, weight.sizes(), device);
  TORCH_CHECK(embeds.stride(2) == 1 || H <= 1, op, ": embeds must have a contiguous last dimension");
  TORCH_CHECK(weight.stride(1) == 1 || H <= 1, op, ": weight must have a contiguous last dimension");
  check_arg(ids, op, "ids", at::kLong, {B, L}, device);
  check_arg(active, op, "active", at::kBool, {B, L}, device);
  check_arg(changed, op, "changed", at::kBool, {B, L}, device);
  check_topk_args(topk_ids, topk_probs, op, B, L, device);
  TORCH_CHECK(mask_id >= 0 && mask_id < weight.size(0), op, ": mask_id must be in [0, V = ",
              weight.size(0), "), got ", mask_id);
}

// The decoding-step ops' own arguments (spd_step, threshold_step: CPU tensors); the ops they
// run check the rest (logits' dtype, k, temperature and seeds: logits_stats; embeds and weight:
// hybrid_embed).
inline void check_step_args(const char* op, const at::Tensor& logits, const at::Tensor& ids,
                            const at::Tensor& done, const at::Tensor& step,
                            const at::Tensor& active, const std::optional<at::Tensor>& seeds,
                            double temperature) {
  TORCH_CHECK(logits.dim() == 3, op, ": logits must be [B, L, V], got ", logits.sizes());
  TORCH_CHECK(logits.device().is_cpu(), op, ": the CPU op got ", logits.device(),
              " tensors (CUDA runs the step's ops one by one)");
  const int64_t B = logits.size(0), L = logits.size(1);
  const auto device = logits.device();
  check_arg(ids, op, "ids", at::kLong, {B, L}, device);
  check_arg(active, op, "active", at::kBool, {B, L}, device);
  check_arg(done, op, "done", at::kBool, {B}, device);
  check_arg(step, op, "step", at::kLong, {}, device);
  TORCH_CHECK(done.is_contiguous(), op, ": done must be contiguous");
  TORCH_CHECK(temperature <= 0 || seeds.has_value(), op,
              ": sampling (temperature > 0) needs the rows' seeds");
}

inline void check_step_embeds(const char* op, const at::Tensor& logits, const at::Tensor& embeds) {
  TORCH_CHECK(embeds.dim() == 3 && embeds.size(0) == logits.size(0) &&
                  embeds.size(1) == logits.size(1),
              op, ": embeds must be [", logits.size(0), ", ", logits.size(1),
              ", H] (B and L of logits), got ", embeds.sizes());
  TORCH_CHECK(embeds.device() == logits.device(), op, ": embeds must be on ", logits.device(),
              " like the other inputs, got ", embeds.device());
}

}  // namespace dmax::checks
