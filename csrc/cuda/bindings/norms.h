// torch.ops.dmax.rms_norm / add_rms_norm / qk_norm_rotary / qk_norm_rotary_write_kv on the kernel
// path (CUDA, or the simt emulation): checks, then the launchers of csrc/cuda/norms.cu.
#pragma once
#include <tuple>
#include <utility>

#include "common/layer_op_checks.h"
#include "cuda/bindings/common.h"
#include "cuda/launchers.h"

namespace dmax::gpu {

// The element stride between consecutive rows of x (all dims but the last, row-major), when one
// stride walks them all (a contiguous tensor, or rows sliced out of a wider one); -1 otherwise.
inline int64_t uniform_row_stride(const at::Tensor& x) {
  int64_t stride = -1, expected = -1;  // expected: the stride dim d must have to continue the walk
  for (int64_t d = x.dim() - 2; d >= 0; --d) {
    if (x.size(d) == 1) continue;
    if (stride < 0) {
      stride = x.stride(d);
    } else if (x.stride(d) != expected) {
      return -1;
    }
    expected = x.stride(d) * x.size(d);
  }
  return stride < 0 ? x.size(-1) : stride;
}

// x's rows as the kernels read them: (x itself and its row stride) where one stride walks them,
// else (a contiguous copy, its width).
inline std::pair<at::Tensor, int64_t> strided_rows(const at::Tensor& x) {
  const int64_t stride = uniform_row_stride(x);
  if (stride >= 0) return {x, stride};
  return {x.contiguous(), x.size(-1)};
}

inline at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  checks::check_rms_norm_args(x, weight);
  check_kernel_device(x, "x");
  DeviceGuard guard(x);
  const auto [rows, row_stride] = strided_rows(x);
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
#ifdef DMAX_SIMT
  out.fill_(NAN);  // poisoned: an element the emulated kernel forgets to write shows up
#endif
  const int64_t hidden = x.size(-1);
  launch_rms_norm(rows.const_data_ptr(), row_stride, w.const_data_ptr(), out.mutable_data_ptr(),
                  float_type_of(x.scalar_type()), x.numel() / hidden, hidden,
                  static_cast<float>(eps), current_stream(x));
  return out;
}

inline std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x,
                                                       const at::Tensor& update,
                                                       const at::Tensor& weight, double eps) {
  checks::check_add_rms_norm_args(x, update, weight);
  check_kernel_device(x, "x");
  DeviceGuard guard(x);
  const auto [rows, row_stride] = strided_rows(x);
  const at::Tensor u = update.contiguous(), w = weight.contiguous();
  at::Tensor sum = at::empty(x.sizes(), x.options());
  at::Tensor normed = at::empty(x.sizes(), x.options());
#ifdef DMAX_SIMT
  sum.fill_(NAN);
  normed.fill_(NAN);
#endif
  const int64_t hidden = x.size(-1);
  launch_add_rms_norm(rows.const_data_ptr(), row_stride, u.const_data_ptr(), w.const_data_ptr(),
                      sum.mutable_data_ptr(), normed.mutable_data_ptr(),
                      float_type_of(x.scalar_type()), x.numel() / hidden, hidden,
                      static_cast<float>(eps), current_stream(x));
  return {sum, normed};
}

// The launch arguments both q|k forms share: qk's heads [0, heads) normalized and rotated, the
// queries (and, without a cache, the keys) into out; q_w, k_w, cos and sin contiguous, kept alive
// by the caller until the launch.
inline QkNormRotaryArgs qk_norm_rotary_args(const at::Tensor& qk, int64_t heads,
                                            int64_t n_q_heads, const at::Tensor& q_w,
                                            const at::Tensor& k_w, const at::Tensor& cos,
                                            const at::Tensor& sin, at::Tensor& out, double eps) {
  QkNormRotaryArgs args;
  args.qk = qk.const_data_ptr();
  args.dtype = float_type_of(qk.scalar_type());
  args.stride_b = qk.stride(0);
  args.stride_l = qk.stride(1);
  args.stride_g = qk.stride(2);
  args.q_weight = q_w.const_data_ptr();
  args.k_weight = k_w.const_data_ptr();
  args.cos = cos.const_data_ptr();
  args.sin = sin.const_data_ptr();
  args.out = out.mutable_data_ptr();
  args.batch = qk.size(0);
  args.length = qk.size(1);
  args.heads = heads;
  args.n_q_heads = n_q_heads;
  args.dim = qk.size(3);
  args.rotary = cos.size(2);
  args.eps = static_cast<float>(eps);
  return args;
}

inline at::Tensor qk_norm_rotary(const at::Tensor& qk, const at::Tensor& q_weight,
                                 const at::Tensor& k_weight, const at::Tensor& cos,
                                 const at::Tensor& sin, int64_t n_q_heads, double eps) {
  checks::check_qk_norm_rotary_args(qk, q_weight, k_weight, cos, sin, n_q_heads);
  check_kernel_device(qk, "qk");
  DeviceGuard guard(qk);
  const at::Tensor q_w = q_weight.contiguous(), k_w = k_weight.contiguous();
  const at::Tensor cos_c = cos.contiguous(), sin_c = sin.contiguous();
  at::Tensor out = at::empty({qk.size(0), qk.size(2), qk.size(1), qk.size(3)}, qk.options());
#ifdef DMAX_SIMT
  out.fill_(NAN);
#endif
  launch_qk_norm_rotary(
      qk_norm_rotary_args(qk, qk.size(2), n_q_heads, q_w, k_w, cos_c, sin_c, out, eps),
      current_stream(qk));
  return out;
}

inline at::Tensor qk_norm_rotary_write_kv(const at::Tensor& qkv, const at::Tensor& q_weight,
                                          const at::Tensor& k_weight, const at::Tensor& cos,
                                          const at::Tensor& sin, int64_t n_q_heads, double eps,
                                          const at::Tensor& keys, const at::Tensor& values,
                                          const at::Tensor& slots) {
  checks::check_qk_norm_rotary_write_kv_args(qkv, q_weight, k_weight, cos, sin, n_q_heads, keys,
                                             values, slots);
  check_kernel_device(qkv, "qkv");
  DeviceGuard guard(qkv);
  const at::Tensor q_w = q_weight.contiguous(), k_w = k_weight.contiguous();
  const at::Tensor cos_c = cos.contiguous(), sin_c = sin.contiguous();
  const at::Tensor slots_c = slots.contiguous();
  const int64_t n_kv = keys.size(1);
  at::Tensor out = at::empty({qkv.size(0), n_q_heads, qkv.size(1), qkv.size(3)}, qkv.options());
#ifdef DMAX_SIMT
  out.fill_(NAN);
#endif
  // heads: the normalized ones; the n_kv value heads follow them
  QkNormRotaryArgs args = qk_norm_rotary_args(qkv, n_q_heads + n_kv, n_q_heads, q_w, k_w, cos_c,
                                              sin_c, out, eps);
  args.keys = keys.data_ptr();
  args.values = values.data_ptr();
  args.cache_stride_b = keys.stride(0);
  args.cache_stride_h = keys.stride(1);
  args.cache_stride_s = keys.stride(2);
  args.slots = slots_c.const_data_ptr<int64_t>();
  args.n_slots = keys.size(2);
  launch_qk_norm_rotary(args, current_stream(qkv));
  return out;
}

}  // namespace dmax::gpu
