// Launcher of the moe_route kernel (csrc/kernels/moe_route.cuh) over raw device pointers.
#include <cstdint>

#include "cuda/launchers.h"
#include "kernels/moe_route.cuh"

namespace dmax {

void launch_moe_route(const float* logits, const float* bias, int64_t* ids, float* weights,
                      int64_t rows, int64_t experts, int64_t n_group, int64_t topk_group,
                      int64_t top_k, float scaling, cudaStream_t stream) {
  if (rows == 0) return;
  const LaunchConfig cfg = kernels::moe_route_launch_config(rows, experts, n_group);
  DMAX_LAUNCH(kernels::moe_route_kernel, cfg.grid, cfg.block, cfg.smem_bytes, stream)(
      logits, bias, ids, weights, rows, static_cast<int>(experts), static_cast<int>(n_group),
      static_cast<int>(topk_group), static_cast<int>(top_k), scaling);
  DMAX_CHECK_LAUNCH("moe_route");
}

}  // namespace dmax
