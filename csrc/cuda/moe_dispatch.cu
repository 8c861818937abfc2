// Launchers of the moe_dispatch and moe_combine kernels (csrc/kernels/moe_dispatch.cuh) over raw
// device pointers.
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/element_type.h"
#include "cuda/launchers.h"
#include "kernels/moe_dispatch.cuh"

namespace dmax {
namespace {

template <class T>
void combine_typed(const void* sorted_out, const int64_t* inverse, const float* weights,
                   const void* addend, const void* residual, void* out, int64_t tokens,
                   int64_t k, int64_t hidden, cudaStream_t stream) {
  const LaunchConfig cfg = kernels::moe_combine_launch_config(tokens, hidden);
  const auto moe_combine_kernel = &kernels::moe_combine_kernel<T>;
  DMAX_LAUNCH(moe_combine_kernel, cfg.grid, cfg.block, cfg.smem_bytes, stream)(
      static_cast<const T*>(sorted_out), inverse, weights, static_cast<const T*>(addend),
      static_cast<const T*>(residual), static_cast<T*>(out), static_cast<int>(k), static_cast<int>(hidden));
}

}  // namespace

void launch_moe_dispatch(const int64_t* ids, int64_t entries, int64_t k, int64_t experts,
                         int64_t* rows, int64_t* inverse, int32_t* offsets, cudaStream_t stream) {
  if (entries > kernels::kMaxDispatchEntries || experts > kernels::kMaxDispatchExperts)
    throw std::runtime_error("moe_dispatch: the kernel takes at most " +
                             std::to_string(kernels::kMaxDispatchEntries) +
                             " routed entries (N * k) and " +
                             std::to_string(kernels::kMaxDispatchExperts) + " experts, got " +
                             std::to_string(entries) + " and " + std::to_string(experts));
  const LaunchConfig cfg = kernels::moe_dispatch_launch_config(entries, experts);
  DMAX_LAUNCH(kernels::moe_dispatch_kernel, cfg.grid, cfg.block, cfg.smem_bytes, stream)(
      ids, static_cast<int>(entries), static_cast<int>(k), static_cast<int>(experts), rows,
      inverse, offsets);
  DMAX_CHECK_LAUNCH("moe_dispatch");
}

void launch_moe_combine(const void* sorted_out, FloatType dtype, const int64_t* inverse,
                        const float* weights, const void* addend, const void* residual, void* out,
                        int64_t tokens, int64_t k, int64_t hidden, cudaStream_t stream) {
  if (tokens == 0 || hidden == 0) return;
  with_element_type(dtype, [&](auto t) {
    combine_typed<decltype(t)>(sorted_out, inverse, weights, addend, residual, out, tokens, k,
                               hidden, stream);
  });
  DMAX_CHECK_LAUNCH("moe_combine");
}

}  // namespace dmax
