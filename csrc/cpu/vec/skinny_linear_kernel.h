// The kernels of dmax.skinny_linear on the CPU. skinny_linear_kernel.cpp is compiled once per CPU
// capability (cmake/cpu_capability.cmake); csrc/cpu/skinny_linear.cpp picks one at run time
// (capability.h).
#pragma once
#include <cstdint>

namespace dmax::cpu {

// out[m, n] = sum_k x[m, k] * weight[n, k] for m < M and n in [begin, end), float32: products
// summed in k order within blocks of 128 terms, the block sums added in order.
struct SkinnyLinearTask {
  const float* xt;      // [K, Mp]: x transposed, Mp = M rounded up to a multiple of 16 (whole
                        // vectors on every capability), zeros past M
  int64_t M, Mp, K, N;
  const float* weight;  // [N, K], row stride K
  float* out;           // [M, N], row stride N
  bool nta_prefetch;    // prefetchnta for the weight stream (cpu_features.h's use_nta_prefetch())
  const float* residual = nullptr;  // [M, N], row stride N, added to the products (x + proj of
                                    // a residual stream, one rounding each as torch has them)
};

// The same product for bfloat16 with AVX512-BF16 dot products (vdpbf16ps): pairs of bf16
// products summed in float32 in k order, the sum rounded once to bf16.
struct SkinnyLinearBf16Task {
  const uint32_t* xt;       // [ceil(K/2), Mp]: (x[m, 2p], x[m, 2p + 1]) as bf16 bits, low half
                            // first; zeros past M and for the missing x[m, K] of an odd K
  int64_t M, Mp, K, N;
  const uint16_t* weight;   // [N, K] bf16 bits, row stride K
  uint16_t* out;            // [M, N] bf16 bits, row stride N
  bool nta_prefetch;        // as SkinnyLinearTask's
  const uint16_t* residual = nullptr;  // as SkinnyLinearTask's: bf16(product + residual), the
                                       // product rounded to bf16 first
};

#define DMAX_DECLARE_SKINNY_LINEAR(cap)                                                     \
  namespace cap {                                                                           \
  /* the weight rows of one register tile: parallel chunks are multiples of it */           \
  int64_t skinny_linear_tile_rows();                                                        \
  void skinny_linear_columns(const SkinnyLinearTask& task, int64_t begin, int64_t end);     \
  /* xt[k, m] = x[m, k] for m < M, 0 for M <= m < Mp: x [M, K] row-major, xt [K, Mp];   \
     moves bits only (bf16 pairs too) */                                                   \
  void skinny_linear_pack(const float* x, int64_t M, int64_t K, int64_t Mp, float* xt);     \
  /* out[m, n] = in[n, m] for n in [begin, end), m < M: 16-bit elements, in [N, M], out    \
     [M, N] */                                                                              \
  void transpose_16bit(const uint16_t* in, int64_t N, int64_t M, uint16_t* out,             \
                       int64_t begin, int64_t end);                                         \
  }
DMAX_DECLARE_SKINNY_LINEAR(DEFAULT)
DMAX_DECLARE_SKINNY_LINEAR(AVX2)
DMAX_DECLARE_SKINNY_LINEAR(AVX512)
#undef DMAX_DECLARE_SKINNY_LINEAR

// Only in the AVX512 copy, for CPUs that also have AVX512-BF16 (cpu_features.h's
// use_bf16_dot()): tiles of skinny_linear_tile_rows() columns, like skinny_linear_columns.
namespace AVX512 {
void skinny_linear_bf16_columns(const SkinnyLinearBf16Task& task, int64_t begin, int64_t end);
}

}  // namespace dmax::cpu
