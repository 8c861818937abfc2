// dmax.rms_norm and dmax.qk_norm_rotary on the CPU: the model's RMSNorm (and, for the attention's
// q and k heads, the RMSNorm followed by the partial rotary embedding) as one op per call, rows
// in parallel, each running csrc/cpu/vec/rms_norm_kernel.cpp. Inputs may be strided views (the
// q|k heads of the fused qkv projection) as long as each row is contiguous.
// Semantics: dmax_ext.model.modules (rms_normalize, apply_rotary); the CUDA kernels:
// csrc/kernels/norms.cuh.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <tuple>
#include <vector>

#include "common/layer_op_checks.h"
#include "cpu/dispatch_float.h"
#include "cpu/vec/capability.h"
#include "cpu/vec/rms_norm_kernel.h"
#include "ops_cpu.h"

namespace dmax::cpu {
namespace {

// Element offset of row r of x (all dims but the last, row-major order).
std::vector<int64_t> row_offsets(const at::Tensor& x) {
  const int64_t dims = x.dim() - 1;
  int64_t rows = 1;
  for (int64_t d = 0; d < dims; ++d) rows *= x.size(d);
  std::vector<int64_t> offsets(rows);
  for (int64_t r = 0; r < rows; ++r) {
    int64_t rest = r, offset = 0;
    for (int64_t d = dims - 1; d >= 0; --d) {
      offset += rest % x.size(d) * x.stride(d);
      rest /= x.size(d);
    }
    offsets[r] = offset;
  }
  return offsets;
}

// Rows per parallel chunk: a row is ~4 H operations; chunks of ~64K keep the threads' start-up
// small against the work.
int64_t row_grain(int64_t H) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(4 * H, 1));
}

template <class T>
at::Tensor rms_norm_typed(const at::Tensor& x, const at::Tensor& weight, double eps) {
  static const auto norm_rows = DMAX_CPU_KERNEL(rms_norm_rows<T>);
  const int64_t H = x.size(-1);
  at::Tensor out = at::empty(x.sizes(), x.options());
  const std::vector<int64_t> offsets = row_offsets(x);
  const T* x_p = x.const_data_ptr<T>();
  const T* w_p = weight.const_data_ptr<T>();
  T* out_p = out.mutable_data_ptr<T>();
  at::parallel_for(0, static_cast<int64_t>(offsets.size()), row_grain(H),
                   [&](int64_t begin, int64_t end) {
    std::vector<NormRow<T>> rows;
    rows.reserve(end - begin);
    for (int64_t r = begin; r < end; ++r) {
      rows.push_back(NormRow<T>{x_p + offsets[r], w_p, nullptr, nullptr, H, 0,
                               static_cast<float>(eps), nullptr, out_p + r * H});
    }
    norm_rows(rows.data(), static_cast<int64_t>(rows.size()));
  });
  return out;
}

template <class T>
at::Tensor qk_norm_rotary_typed(const at::Tensor& qk, const at::Tensor& q_weight,
                                const at::Tensor& k_weight, const at::Tensor& cos_in,
                                const at::Tensor& sin_in, int64_t n_q_heads, double eps) {
  static const auto norm_rows = DMAX_CPU_KERNEL(rms_norm_rows<T>);
  const int64_t B = qk.size(0), L = qk.size(1), G = qk.size(2), D = qk.size(3);
  const int64_t R = cos_in.size(2);
  const at::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous();
  at::Tensor out = at::empty({B, G, L, D}, qk.options());
  const T* x_p = qk.const_data_ptr<T>();
  const T* q_w = q_weight.const_data_ptr<T>();
  const T* k_w = k_weight.const_data_ptr<T>();
  const T* cos_p = cos.const_data_ptr<T>();
  const T* sin_p = sin.const_data_ptr<T>();
  T* out_p = out.mutable_data_ptr<T>();
  const int64_t stride_b = qk.stride(0), stride_l = qk.stride(1), stride_g = qk.stride(2);
  const float eps_f = static_cast<float>(eps);
  at::parallel_for(0, B * L, std::max<int64_t>(1, row_grain(D) / G), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(D + R);  // shared: the kernel writes its rows one after another
    std::vector<NormRow<T>> heads(G);
    for (int64_t bl = begin; bl < end; ++bl) {  // bl = b * L + l: the input's order
      const int64_t b = bl / L, l = bl % L;
      const T* x_row = x_p + b * stride_b + l * stride_l;
      T* out_row = out_p + b * G * L * D + l * D;
      for (int64_t g = 0; g < G; ++g) {
        heads[g] = NormRow<T>{x_row + g * stride_g, g < n_q_heads ? q_w : k_w, cos_p + bl * R,
                              sin_p + bl * R, D, R, eps_f, scratch.data(), out_row + g * L * D};
      }
      norm_rows(heads.data(), G);  // a token's heads together: their scales overlap
    }
  });
  return out;
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  checks::check_rms_norm_args(x, weight);
  const at::Tensor w = weight.contiguous();
  return dispatch_float(x.scalar_type(), [&](auto t) {
    return rms_norm_typed<decltype(t)>(x, w, eps);
  });
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& update,
                                                const at::Tensor& weight, double eps) {
  checks::check_add_rms_norm_args(x, update, weight);
  // The CPU's own decode runs whole layers as dmax.decoder_layer; this form serves the CPU
  // standing for CUDA (set_cpu_variants(False)): the plain composition, torch's add.
  const at::Tensor sum = at::add(x, update).contiguous();
  return {sum, rms_norm(sum, weight, eps)};
}

at::Tensor qk_norm_rotary(const at::Tensor& qk, const at::Tensor& q_weight,
                          const at::Tensor& k_weight, const at::Tensor& cos,
                          const at::Tensor& sin, int64_t n_q_heads, double eps) {
  checks::check_qk_norm_rotary_args(qk, q_weight, k_weight, cos, sin, n_q_heads);
  const at::Tensor q_w = q_weight.contiguous(), k_w = k_weight.contiguous();
  return dispatch_float(qk.scalar_type(), [&](auto t) {
    return qk_norm_rotary_typed<decltype(t)>(qk, q_w, k_w, cos, sin, n_q_heads, eps);
  });
}

at::Tensor qk_norm_rotary_write_kv(const at::Tensor& qkv, const at::Tensor& q_weight,
                                   const at::Tensor& k_weight, const at::Tensor& cos,
                                   const at::Tensor& sin, int64_t n_q_heads, double eps,
                                   const at::Tensor& keys, const at::Tensor& values,
                                   const at::Tensor& slots) {
  checks::check_qk_norm_rotary_write_kv_args(qkv, q_weight, k_weight, cos, sin, n_q_heads, keys,
                                             values, slots);
  const int64_t n_kv = keys.size(1), n_slots = keys.size(2);
  const at::Tensor slots_c = slots.contiguous();
  const int64_t* slot = slots_c.const_data_ptr<int64_t>();
  for (int64_t l = 0; l < slots.numel(); ++l) {
    TORCH_CHECK(slot[l] >= 0 && slot[l] < n_slots, "qk_norm_rotary_write_kv: slots must be in "
                "[0, ", n_slots, ") (keys' slots), got ", slot[l], " at ", l);
  }
  // The CPU's own decode runs the whole layer as dmax.decoder_layer; this form serves the CPU
  // standing for CUDA (set_cpu_variants(False)), so it is the plain composition.
  const at::Tensor qk = qk_norm_rotary(qkv.narrow(2, 0, n_q_heads + n_kv), q_weight, k_weight,
                                       cos, sin, n_q_heads, eps);  // [B, heads, L, D]
  keys.index_copy_(2, slots_c, qk.narrow(1, n_q_heads, n_kv));
  values.index_copy_(2, slots_c, qkv.narrow(2, n_q_heads + n_kv, n_kv).transpose(1, 2));
  return qk.narrow(1, 0, n_q_heads).contiguous();
}

}  // namespace dmax::cpu
