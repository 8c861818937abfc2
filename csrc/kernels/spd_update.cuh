// spd_update: SPEC section 3 steps 4-5, per sequence: new ids, which changed, converged.
// Semantics: dmax_ext.reference.spd_update_reference.
//
// One block per sequence (blockIdx.x = b), whole warps over its L positions (a loop when L is
// larger than the block). Three block-wide votes: any masked position (decides the update rule),
// any change and any unconfident active position (decide convergence).
#pragma once
#include <cstdint>

#include "kernels/block_reduce.cuh"
#include "kernels/device.h"

namespace dmax::kernels {

constexpr unsigned kSpdUpdateMaxThreads = 256;

__global__ void __launch_bounds__(kSpdUpdateMaxThreads)
spd_update_kernel(const int64_t* __restrict__ ids, const bool* __restrict__ active,
                  const bool* __restrict__ promoted, const int64_t* __restrict__ pred,
                  const float* __restrict__ conf, int length, float accept_threshold,
                  int64_t mask_id, int64_t* __restrict__ new_ids, bool* __restrict__ changed,
                  bool* __restrict__ converged) {
  __shared__ int scratch[kMaxWarps];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * length;
  const int step = static_cast<int>(blockDim.x);

  bool masked = false, unconfident = false;
  for (int64_t l = row + threadIdx.x; l < row + length; l += step) {
    masked = masked || ids[l] == mask_id;
    unconfident = unconfident || (active[l] && !(conf[l] >= accept_threshold));
  }
  const bool any_masked = block_any(masked, scratch);

  bool changed_here = false;
  for (int64_t l = row + threadIdx.x; l < row + length; l += step) {
    const int64_t id = ids[l], p = pred[l];
    // With nothing masked, every active position is revised (the release's rule).
    const bool update = any_masked ? promoted[l] || (active[l] && id != mask_id) : active[l];
    const bool ch = update && p != id;
    new_ids[l] = update ? p : id;
    changed[l] = ch;
    changed_here = changed_here || ch;
  }
  const bool any_changed = block_any(changed_here, scratch);
  const bool all_confident = !block_any(unconfident, scratch);
  if (threadIdx.x == 0) converged[blockIdx.x] = all_confident || !any_changed;
}

inline LaunchConfig spd_update_launch_config(int64_t batch, int64_t length) {
  return {dim3(static_cast<unsigned>(batch)), dim3(block_threads_for(length, kSpdUpdateMaxThreads)), 0};
}

}  // namespace dmax::kernels
