// Counter-based hash RNG shared by every sampling op (docs/ARCHITECTURE.md, `rng_uniform`), and
// the categorical draw built on it. One stateless function of (seed, a, b): the CPU ops, the CUDA
// kernels (nvcc and the simt host build) and python/dmax_ext/reference.py (rng_uniform,
// bit-exact) all compute the same u. No dependency on kernels/device.h, so plain g++ translation
// units can include it too.
#pragma once
#include <math.h>

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

// The 24 random bits q behind u = (q + 0.5) / 2^24 (samplers that bound u cheaply use them).
DMAX_HD uint32_t rng_bits_from_row(uint32_t row_state, uint32_t b) {
  return mix32(row_state ^ b) >> 8;
}

// u in (0, 1): (q + 0.5) / 2^24 with q = h >> 8, never 0 or 1, exact in double.
DMAX_HD double rng_uniform_from_bits(uint32_t q) {
  return (static_cast<double>(q) + 0.5) * (1.0 / 16777216.0);
}

DMAX_HD double rng_uniform_from_row(uint32_t row_state, uint32_t b) {
  return rng_uniform_from_bits(rng_bits_from_row(row_state, b));
}

DMAX_HD double rng_uniform(int64_t seed, uint32_t a, uint32_t b) {
  return rng_uniform_from_row(rng_row_state(rng_seed_state(seed), a), b);
}

// The largest u that rng_uniform can return; Gumbel pruning bounds the noise with it.
constexpr double kRngUniformMax = (16777215.0 + 0.5) / 16777216.0;

// onpolicy_noise's draw among k <= 8 candidates with probabilities p: the first i with
// cumsum(q)_i > u * cumsum(q)_{k-1}, q_i = (p_i / max_j p_j)^inv_t in double (proportional to
// p_i^(1/T); the scaling keeps small T from underflowing them all). 0 when max p is 0 or a p is
// NaN. Fixed trip counts, so a CUDA thread keeps c in registers.
DMAX_HD int draw_tempered_candidate(const float* p, int k, double inv_t, double u) {
  double p_max = 0.0;
  bool has_nan = false;
  for (int i = 0; i < k; ++i) {
    has_nan = has_nan || p[i] != p[i];
    p_max = fmax(p_max, static_cast<double>(p[i]));
  }
  if (has_nan || !(p_max > 0.0)) return 0;
  double c[8];
  double total = 0.0;
  for (int i = 0; i < 8; ++i) {
    if (i < k) total += pow(static_cast<double>(p[i]) / p_max, inv_t);
    c[i] = total;
  }
  const double target = u * total;
  for (int i = 0; i < 8; ++i) {
    if (i < k && c[i] > target) return i;
  }
  return 0;
}

}  // namespace dmax

#undef DMAX_HD
