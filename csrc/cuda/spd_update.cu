// Launcher of the spd_update kernel (csrc/kernels/spd_update.cuh) over raw device pointers.
#include "cuda/launchers.h"
#include "kernels/spd_update.cuh"

namespace dmax {

void launch_spd_update(const int64_t* ids, const bool* active, const bool* promoted,
                       const int64_t* pred, const float* conf, int64_t batch, int64_t length,
                       float accept_threshold, int64_t mask_id, int64_t* new_ids, bool* changed,
                       bool* converged, cudaStream_t stream) {
  if (batch == 0) return;
  const LaunchConfig cfg = kernels::spd_update_launch_config(batch, length);
  DMAX_LAUNCH(kernels::spd_update_kernel, cfg.grid, cfg.block, cfg.smem_bytes, stream)(
      ids, active, promoted, pred, conf, static_cast<int>(length), accept_threshold, mask_id,
      new_ids, changed, converged);
  DMAX_CHECK_LAUNCH("spd_update");
}

}  // namespace dmax
