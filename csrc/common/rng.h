// Counter-based hash RNG shared by every sampling op (docs/ARCHITECTURE.md, `rng_uniform`).
// One stateless function of (seed, a, b): the CPU ops, the CUDA kernels (nvcc and the simt host
// build) and python/dmax_ext/reference.py (rng_uniform, bit-exact) all compute the same u.
// No dependency on kernels/device.h, so plain g++ translation units can include it too.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define DMAX_HD __host__ __device__ __forceinline__
#else
#define DMAX_HD inline
#endif

namespace dmax {

// lowbias32 (Chris Wellons' hash prospector): every step is mod 2^32.
DMAX_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// The part of the hash that depends on the seed only: hoisted out of per-element loops.
DMAX_HD uint32_t rng_seed_state(int64_t seed) {
  const uint64_t s = static_cast<uint64_t>(seed);
  uint32_t h = mix32(static_cast<uint32_t>(s) ^ 0x9E3779B9U);
  return mix32(h ^ static_cast<uint32_t>(s >> 32));
}

// The part that depends on (seed, a): hoisted out of the loop over b (e.g. over the vocabulary).
DMAX_HD uint32_t rng_row_state(uint32_t seed_state, uint32_t a) { return mix32(seed_state ^ a); }

// u in (0, 1): ((h >> 8) + 0.5) / 2^24, never 0 or 1, exact in double.
DMAX_HD double rng_uniform_from_row(uint32_t row_state, uint32_t b) {
  const uint32_t h = mix32(row_state ^ b);
  return (static_cast<double>(h >> 8) + 0.5) * (1.0 / 16777216.0);
}

DMAX_HD double rng_uniform(int64_t seed, uint32_t a, uint32_t b) {
  return rng_uniform_from_row(rng_row_state(rng_seed_state(seed), a), b);
}

// The largest u that rng_uniform can return; Gumbel pruning bounds the noise with it.
constexpr double kRngUniformMax = (16777215.0 + 0.5) / 16777216.0;

}  // namespace dmax

#undef DMAX_HD
