// promote: which masked positions of each sequence take their prediction (SPEC section 3 step 3,
// and the hard-threshold baseline). Semantics: dmax_ext.reference.promote_reference.
//
// One block per sequence (blockIdx.x = b), whole warps over its L positions, a loop when L is
// larger than the block. The SPD prefix rule is two "first index" problems (first masked
// position, first masked position below the threshold), each a ballot + __ffs per warp and a
// min over the warps; the baseline needs a block-wide any (something reaches the threshold) and
// a block-wide max (the best eligible confidence).
#pragma once
#include <cstdint>

#include "kernels/block_reduce.cuh"
#include "kernels/device.h"

namespace dmax::kernels {

constexpr unsigned kPromoteMaxThreads = 256;

__global__ void __launch_bounds__(kPromoteMaxThreads)
promote_kernel(const int64_t* __restrict__ ids, const float* __restrict__ conf,
               const int64_t* __restrict__ pred, bool* __restrict__ promoted, int length,
               float threshold, int64_t mask_id, bool prefix) {
  __shared__ int scratch_int[kMaxWarps];
  __shared__ float scratch_float[kMaxWarps];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * length;
  ids += row;
  conf += row;
  pred += row;
  promoted += row;
  const int step = static_cast<int>(blockDim.x);

  if (prefix) {
    const int first_masked = block_first_true(
        length, [&](int l) { return __ldg(ids + l) == mask_id; }, scratch_int);
    const int first_low = block_first_true(
        length, [&](int l) { return __ldg(ids + l) == mask_id && __ldg(conf + l) < threshold; },
        scratch_int);
    // The run before the first low one; when it is empty, the first masked position alone.
    const int cutoff = max(first_low, first_masked + 1);
    for (int l = threadIdx.x; l < length; l += step)
      promoted[l] = __ldg(ids + l) == mask_id && l < cutoff;
    return;
  }

  bool above = false;
  float best = -INFINITY;
  for (int l = threadIdx.x; l < length; l += step) {
    if (__ldg(ids + l) != mask_id || __ldg(pred + l) == mask_id) continue;
    const float c = __ldg(conf + l);
    above = above || c >= threshold;
    best = max(best, c);
  }
  const bool any_above = block_any(above, scratch_int);
  best = block_max(best, scratch_float);
  const float limit = any_above ? threshold : best - 1e-5f;
  for (int l = threadIdx.x; l < length; l += step)
    promoted[l] = __ldg(ids + l) == mask_id && __ldg(pred + l) != mask_id && __ldg(conf + l) >= limit;
}

inline LaunchConfig promote_launch_config(int64_t batch, int64_t length) {
  return {dim3(static_cast<unsigned>(batch)), dim3(block_threads_for(length, kPromoteMaxThreads)), 0};
}

}  // namespace dmax::kernels
