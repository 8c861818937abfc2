// Launcher of the onpolicy_noise kernel (csrc/kernels/onpolicy_noise.cuh) over raw device pointers.
#include "cuda/launchers.h"
#include "kernels/onpolicy_noise.cuh"

namespace dmax {

void launch_onpolicy_noise(const int64_t* noisy_ids, const bool* sample_flags,
                           const int64_t* topk_ids, const float* topk_probs, int64_t batch,
                           int64_t length, int k, double temperature, const int64_t* seeds,
                           int64_t mask_id, int64_t* new_ids, cudaStream_t stream) {
  const int64_t positions = batch * length;
  if (positions == 0) return;
  const LaunchConfig cfg = kernels::onpolicy_noise_launch_config(positions);
  const double inv_temperature = temperature > 0.0 ? 1.0 / temperature : 0.0;
  DMAX_LAUNCH(kernels::onpolicy_noise_kernel, cfg.grid, cfg.block, cfg.smem_bytes, stream)(
      noisy_ids, sample_flags, topk_ids, topk_probs, positions, static_cast<int>(length), k,
      inv_temperature, seeds, mask_id, new_ids);
  DMAX_CHECK_LAUNCH("onpolicy_noise");
}

}  // namespace dmax
