// Launcher of the promote kernel (csrc/kernels/promote.cuh) over raw device pointers.
#include "cuda/launchers.h"
#include "kernels/promote.cuh"

namespace dmax {

void launch_promote(const int64_t* ids, const float* conf, const int64_t* pred, bool* promoted,
                    int64_t batch, int64_t length, float threshold, int64_t mask_id, bool prefix,
                    cudaStream_t stream) {
  if (batch == 0 || length == 0) return;
  const LaunchConfig cfg = kernels::promote_launch_config(batch, length);
  DMAX_LAUNCH(kernels::promote_kernel, cfg.grid, cfg.block, cfg.smem_bytes, stream)(
      ids, conf, pred, promoted, static_cast<int>(length), threshold, mask_id, prefix);
  DMAX_CHECK_LAUNCH("promote");
}

}  // namespace dmax
