// dmax.onpolicy_noise as a CUDA kernel (semantics: python/dmax_ext/reference.py,
// onpolicy_noise_reference): one thread per position (b, l); a flagged sample's masked position
// takes candidate 0, or with temperature > 0 and k > 1 a draw over its k candidates with
// q_i = (p_i / max p)^(1/T) in double: the first i with cumsum(q)_i > u * cumsum(q)_{k-1},
// u = rng_uniform(seeds[b], l, 0). No shared memory, no collectives.
#pragma once
#include "common/rng.h"
#include "kernels/device.h"

namespace dmax::kernels {

constexpr int kOnpolicyNoiseThreads = 256;

__global__ void __launch_bounds__(kOnpolicyNoiseThreads)
    onpolicy_noise_kernel(const int64_t* __restrict__ noisy_ids,
                          const bool* __restrict__ sample_flags,
                          const int64_t* __restrict__ topk_ids,
                          const float* __restrict__ topk_probs, int64_t positions, int length,
                          int k, double inv_temperature, const int64_t* __restrict__ seeds,
                          int64_t mask_id, int64_t* __restrict__ new_ids) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= positions) return;
  const int64_t b = r / length;
  const int64_t id = noisy_ids[r];
  if (!sample_flags[b] || id != mask_id) {
    new_ids[r] = id;
    return;
  }
  int chosen = 0;
  if (inv_temperature > 0.0 && k > 1) {
    const double u = rng_uniform(seeds[b], static_cast<uint32_t>(r % length), 0u);
    chosen = draw_tempered_candidate(topk_probs + r * k, k, inv_temperature, u);
  }
  new_ids[r] = topk_ids[r * k + chosen];
}

inline LaunchConfig onpolicy_noise_launch_config(int64_t positions) {
  LaunchConfig cfg;
  const int64_t blocks = (positions + kOnpolicyNoiseThreads - 1) / kOnpolicyNoiseThreads;
  cfg.grid = dim3(static_cast<unsigned>(blocks < 1 ? 1 : blocks), 1, 1);
  cfg.block = dim3(kOnpolicyNoiseThreads, 1, 1);
  cfg.smem_bytes = 0;
  return cfg;
}

}  // namespace dmax::kernels
