// Launchers of the rms_norm and qk_norm_rotary kernels (csrc/kernels/norms.cuh) over raw device
// pointers: pick the element type.
#include <cstdint>

#include "cuda/element_type.h"
#include "cuda/launchers.h"
#include "kernels/norms.cuh"

namespace dmax {
namespace {

template <class T>
void rms_norm_typed(const void* x, int64_t x_row_stride, const void* weight, void* out,
                    int64_t rows, int64_t hidden, float eps, cudaStream_t stream) {
  const LaunchConfig cfg = kernels::norm_launch_config(rows, 0);
  const auto rms_norm_kernel = &kernels::rms_norm_kernel<T>;
  DMAX_LAUNCH(rms_norm_kernel, cfg.grid, cfg.block, cfg.smem_bytes, stream)(
      static_cast<const T*>(x), x_row_stride, static_cast<const T*>(weight),
      static_cast<T*>(out), rows, static_cast<int>(hidden), eps);
}

template <class T, bool kWriteKv>
void qk_norm_rotary_launch(const QkNormRotaryArgs& a, cudaStream_t stream) {
  const int64_t rows_per_token = kWriteKv ? 2 * a.heads - a.n_q_heads : a.heads;
  const LaunchConfig cfg = kernels::norm_launch_config(a.batch * a.length * rows_per_token, a.dim);
  kernels::KvCache<T> cache;
  cache.keys = static_cast<T*>(a.keys);
  cache.values = static_cast<T*>(a.values);
  cache.stride_b = a.cache_stride_b;
  cache.stride_h = a.cache_stride_h;
  cache.stride_s = a.cache_stride_s;
  cache.slots = a.slots;
  cache.n_slots = a.n_slots;
  const auto qk_norm_rotary_kernel = &kernels::qk_norm_rotary_kernel<T, kWriteKv>;
  DMAX_LAUNCH(qk_norm_rotary_kernel, cfg.grid, cfg.block, cfg.smem_bytes, stream)(
      static_cast<const T*>(a.qk), a.stride_b, a.stride_l, a.stride_g,
      static_cast<const T*>(a.q_weight), static_cast<const T*>(a.k_weight),
      static_cast<const T*>(a.cos), static_cast<const T*>(a.sin), static_cast<T*>(a.out), cache,
      a.batch, static_cast<int>(a.length), static_cast<int>(a.heads),
      static_cast<int>(a.n_q_heads), static_cast<int>(a.dim), static_cast<int>(a.rotary), a.eps);
}

template <class T>
void qk_norm_rotary_typed(const QkNormRotaryArgs& a, cudaStream_t stream) {
  if (a.keys != nullptr)
    qk_norm_rotary_launch<T, true>(a, stream);
  else
    qk_norm_rotary_launch<T, false>(a, stream);
}

template <class T>
void add_rms_norm_typed(const void* x, int64_t x_row_stride, const void* update,
                        const void* weight, void* sum, void* normed, int64_t rows,
                        int64_t hidden, float eps, cudaStream_t stream) {
  const LaunchConfig cfg = kernels::norm_launch_config(rows, 0);
  const auto add_rms_norm_kernel = &kernels::add_rms_norm_kernel<T>;
  DMAX_LAUNCH(add_rms_norm_kernel, cfg.grid, cfg.block, cfg.smem_bytes, stream)(
      static_cast<const T*>(x), x_row_stride, static_cast<const T*>(update),
      static_cast<const T*>(weight), static_cast<T*>(sum), static_cast<T*>(normed), rows,
      static_cast<int>(hidden), eps);
}

}  // namespace

void launch_add_rms_norm(const void* x, int64_t x_row_stride, const void* update,
                         const void* weight, void* sum, void* normed, FloatType dtype,
                         int64_t rows, int64_t hidden, float eps, cudaStream_t stream) {
  if (rows == 0 || hidden == 0) return;
  with_element_type(dtype, [&](auto t) {
    add_rms_norm_typed<decltype(t)>(x, x_row_stride, update, weight, sum, normed, rows, hidden,
                                    eps, stream);
  });
  DMAX_CHECK_LAUNCH("add_rms_norm");
}

void launch_rms_norm(const void* x, int64_t x_row_stride, const void* weight, void* out,
                     FloatType dtype, int64_t rows, int64_t hidden, float eps,
                     cudaStream_t stream) {
  if (rows == 0 || hidden == 0) return;
  with_element_type(dtype, [&](auto t) {
    rms_norm_typed<decltype(t)>(x, x_row_stride, weight, out, rows, hidden, eps, stream);
  });
  DMAX_CHECK_LAUNCH("rms_norm");
}

void launch_qk_norm_rotary(const QkNormRotaryArgs& args, cudaStream_t stream) {
  if (args.batch == 0 || args.length == 0 || args.heads == 0 || args.dim == 0) return;
  with_element_type(args.dtype,
                    [&](auto t) { qk_norm_rotary_typed<decltype(t)>(args, stream); });
  DMAX_CHECK_LAUNCH("qk_norm_rotary");
}

}  // namespace dmax
