// dmax.moe_experts on the CPU, one expert at a time (compiled once per CPU capability, see
// moe_experts_kernel.h). A block forward routes a few rows to each expert (32 tokens x 8 slots over
// 64..256 experts), so an expert's FFN is a skinny GEMM pair that reads each weight once; with the
// weights in cache (or streamed by the panel prefetch) it is bound by the multiply-add rate.
// Two forms of the GEMMs, both register-blocked tiles of rows x column vectors over K-major weights,
// one pass over each weight column tile per row tile, panels of consecutive weight rows streamed:
//  - float32 FMAs on weights converted in registers (bf16 -> f32 is a shift): every dtype;
//  - bfloat16 on the AVX512 copy where cpu_features.h's use_bf16_dot() says so: AVX512-BF16 dot
//    products (vdpbf16ps, 32 multiply-adds per instruction against 16 for an FMA: ~2x on cores
//    with one 512-bit FMA pipe, AMD Zen 4), the routed rows and the SwiGLU hidden kept in bf16;
//    from the weights as stored, or packed for them (ops.pack_moe_weights: packed_gemm).
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif
#include <type_traits>
#include <utility>

#include "cpu/vec/bf16_dot_target.h"
#include "cpu/vec/load_float.h"
#include "cpu/vec/moe_experts_kernel.h"
#include "cpu/vec/prefetch.h"
#include "cpu/vec/swiglu.h"

namespace dmax::cpu::CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
// Register tiles of the float32 FMA form: kRows<T> routed rows x kVecs<T> vectors of columns.
// AVX512: float32 weights 12 x 2 (24 accumulators: an expert's ~10 routed rows of a block in
// one pass over each weight panel, where 6 x 4 took two or three; an llada2-small layer, cold
// weights: see docs/PERFORMANCE.md), 16-bit weights 5 x 4 (their conversions need registers:
// more rows made GCC spill). AVX2: 4 x 2 of 16 ymm registers.
#if defined(CPU_CAPABILITY_AVX512)
template <class T>
constexpr int kVecs = std::is_same_v<T, float> ? 2 : 4;
template <class T>
constexpr int kRows = std::is_same_v<T, float> ? 12 : 5;
#else
template <class T>
constexpr int kVecs = 2;
template <class T>
constexpr int kRows = 4;
#endif
// Experts of at most kWideRows routed rows: strips of kWideVecs vectors (2 x 8 accumulators and
// 8 weight vectors of 32 zmm; 2 x 4 and 4 of 16 ymm).
constexpr int kWideRows = 2;
constexpr int kWideVecs = kW == 16 ? 8 : 4;

// Loads kW elements of T as float32 (no tail: the full-width path of the GEMM tiles). Returned by
// value from intrinsics: at::vec::load_to_float's out-parameter made GCC spill the tiles'
// accumulators to the stack (bf16 ran 2x slower than float32).
template <class T>
inline Vec load_full(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
#if defined(CPU_CAPABILITY_AVX512)
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return Vec(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)));
#elif defined(CPU_CAPABILITY_AVX2)
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return Vec(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16)));
#else
    Vec v;
    at::vec::load_to_float(p, v);
    return v;
#endif
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    return Vec(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(CPU_CAPABILITY_AVX2)
    return Vec(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
    Vec v;
    at::vec::load_to_float(p, v);
    return v;
#endif
  }
}

// c[i, :NV kW] (+)= a[i, :K] @ b[:K, :NV kW] for i < MB: a float32 (row stride lda), b in T (row
// stride ldb), c float32 (row stride ldc), accumulated onto c when `accumulate`. Full-width tiles
// only: no branch on widths in the inner loop, so the MB x NV accumulators stay in registers.
template <class T, int MB, int NV, class Pf>
inline void gemm_tile(const float* a, int64_t lda, const T* b, int64_t ldb, int64_t K, float* c,
                      int64_t ldc, bool accumulate, Pf& prefetch) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (!std::is_same_v<T, float>) {
    // Raw __m512 accumulators: with Vectorized<float> ones GCC spilled them to the stack for
    // 16-bit weights (not for float32), halving the tile's speed.
    __m512 acc[MB][NV];
    for (int i = 0; i < MB; ++i)
      for (int v = 0; v < NV; ++v)
        acc[i][v] = accumulate ? _mm512_loadu_ps(c + i * ldc + v * kW) : _mm512_setzero_ps();
    for (int64_t kk = 0; kk < K; ++kk) {
      prefetch.step();
      const T* row = b + kk * ldb;
      __m512 w[NV];
      for (int v = 0; v < NV; ++v) w[v] = load_full(row + v * kW);
      for (int i = 0; i < MB; ++i) {
        const __m512 xa = _mm512_set1_ps(a[i * lda + kk]);
        for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(xa, w[v], acc[i][v]);
      }
    }
    for (int i = 0; i < MB; ++i)
      for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + i * ldc + v * kW, acc[i][v]);
    return;
  }
#endif
  Vec acc[MB][NV];
  for (int i = 0; i < MB; ++i)
    for (int v = 0; v < NV; ++v)
      acc[i][v] = accumulate ? Vec::loadu(c + i * ldc + v * kW) : Vec(0.f);
  for (int64_t kk = 0; kk < K; ++kk) {
    prefetch.step();
    const T* row = b + kk * ldb;
    Vec w[NV];
    for (int v = 0; v < NV; ++v) w[v] = load_full(row + v * kW);
    for (int i = 0; i < MB; ++i) {
      const Vec xa(a[i * lda + kk]);
      for (int v = 0; v < NV; ++v) acc[i][v] = at::vec::fmadd(xa, w[v], acc[i][v]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v].store(c + i * ldc + v * kW);
}

// Calls tile.template operator()<MB>(i) for passes of MB rows from row i that cover rows
// [0, m): as few passes as tiles of at most kMax rows allow, their sizes as even as can be. A
// pass of few rows is bound by its multiply-adds' latency (few chains in flight), so 16 rows go
// as 8 + 8, not 14 + 2 (llada2-small's bf16 block forward: 1.012x, 34 of 40 interleaved turns).
// Each size has its own instantiation (its accumulators in registers); a row's sums do not
// depend on the pass it is in.
template <int kMax, class Tile>
inline void row_passes(int64_t m, Tile&& tile) {
  const int64_t passes = (m + kMax - 1) / kMax;
  for (int64_t p = 0, i = 0; p < passes; ++p) {
    const int64_t rows = m / passes + (p < m % passes);
    [&]<int... N>(std::integer_sequence<int, N...>) {
      ((rows == N + 1 ? (tile.template operator()<N + 1>(i), 0) : 0), ...);
    }(std::make_integer_sequence<int, kMax>{});
    i += rows;
  }
}

template <class T, int NV, class Pf>
void gemm_rows(const float* a, int64_t lda, int64_t m, const T* b, int64_t ldb, int64_t K,
               float* c, int64_t ldc, bool accumulate, Pf& pf) {
  row_passes<kRows<T>>(m, [&]<int MB>(int64_t i) {
    gemm_tile<T, MB, NV>(a + i * lda, lda, b, ldb, K, c + i * ldc, ldc, accumulate, pf);
  });
}

// The columns past the last full vector: plain loops (widths that are not multiples of kW).
template <class T>
void gemm_tail(const float* a, int64_t m, int64_t K, const T* b, int64_t n, int64_t j0,
               float* c, bool accumulate) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = j0; j < n; ++j) {
      float sum = accumulate ? c[i * n + j] : 0.f;
      for (int64_t kk = 0; kk < K; ++kk) sum += a[i * K + kk] * static_cast<float>(b[kk * n + j]);
      c[i * n + j] = sum;
    }
}

// c[:m, :n] = a[:m, :K] @ b[:K, :n] (b row-major [K, n] in T). b is consumed in panels of
// consecutive rows (kPanelBytes): each panel is contiguous memory, read once from DRAM in order
// and then from cache by every tile, so the weights stream like a copy. `then` (row-major, rows
// of then_n, or nullptr): the matrix read next, whose first panel comes in during the last one.
template <class T, class Pf>
void gemm(const float* a, int64_t m, int64_t K, const T* b, int64_t n, float* c,
          const T* then, int64_t then_n) {
  // 32 KB: each panel row block is reused by every row tile while in L1 / L2, and the tiles
  // reload their accumulators once per panel (16 KB: every 8 rows of down's [128, 512]; 32 KB
  // made an llada2-small layer's experts 1.35 -> 1.14 ms with hot weights, float32).
  constexpr int64_t kPanelBytes = 32 * 1024;
  const int64_t panel = std::max<int64_t>(1, kPanelBytes / (n * static_cast<int64_t>(sizeof(T))));
  const int64_t full = n / kW * kW;
  // One or two routed rows (a weight stream with little arithmetic): strips of kWideVecs
  // vectors, so each weight row is read in a few passes (dot_gemm's wide strips).
  const bool wide = m <= kWideRows;
  const int64_t strip = (wide ? kWideVecs : kVecs<T>) * kW;
  const int64_t tiles = full / strip + full % strip / kW;
  const int64_t steps_per_panel =
      std::max<int64_t>(1, tiles * ((m + kRows<T> - 1) / kRows<T>) * panel);
  for (int64_t k0 = 0; k0 < K; k0 += panel) {
    const int64_t kn = std::min(panel, K - k0);
    const bool accumulate = k0 > 0;
    // The tiles read a panel column tile by column tile (strided), which the hardware
    // prefetchers do not follow: the next panel is prefetched in address order meanwhile.
    const char* next = reinterpret_cast<const char*>(b + (k0 + kn) * n);
    int64_t next_lines =
        (std::min(panel, K - k0 - kn) * n * static_cast<int64_t>(sizeof(T)) + 63) / 64;
    if (k0 + kn >= K && then != nullptr) {  // the last panel: the next matrix's first one
      const int64_t then_row = then_n * static_cast<int64_t>(sizeof(T));
      next = reinterpret_cast<const char*>(then);
      next_lines = (std::max<int64_t>(1, kPanelBytes / then_row) * then_row + 63) / 64;
    }
    Pf pf{next, next + 64 * next_lines, (next_lines + steps_per_panel - 1) / steps_per_panel};
    int64_t j = 0;
    for (; wide && j + strip <= full; j += strip) {
      if (m == 1) {
        gemm_tile<T, 1, kWideVecs>(a + k0, K, b + k0 * n + j, n, kn, c + j, n, accumulate, pf);
      } else {
        gemm_tile<T, 2, kWideVecs>(a + k0, K, b + k0 * n + j, n, kn, c + j, n, accumulate, pf);
      }
    }
    for (; j + kVecs<T> * kW <= full; j += kVecs<T> * kW)
      gemm_rows<T, kVecs<T>>(a + k0, K, m, b + k0 * n + j, n, kn, c + j, n, accumulate, pf);
    for (; j < full; j += kW)
      gemm_rows<T, 1>(a + k0, K, m, b + k0 * n + j, n, kn, c + j, n, accumulate, pf);
  }
  if (full < n) gemm_tail(a, m, K, b, n, full, c, false);
}

#if defined(CPU_CAPABILITY_AVX512)
// ---- bfloat16 GEMMs in AVX512-BF16 dot products ----
// vdpbf16ps acc, w, x: acc[j] += w[2j] x[2j] + w[2j + 1] x[2j + 1] (16 float32 lanes, bf16 pairs).
// Over K-major weights the pairs are (row k, row k + 1) of one column: a tile loads 32 columns of
// both rows and interleaves them (unpacklo/hi_epi16), and broadcasts a[i, k..k+1], two adjacent
// bf16s of the routed row, as one 32-bit lane. Numerics: a bf16 x bf16 product is exact in
// float32, so only the summation order differs from the FMA form (each pair is added to the
// accumulator, odd k first); but vdpbf16ps treats denormal inputs as zero and flushes denormal
// results, whatever MXCSR says (bf16 denormals are < 1.2e-38: no weight or activation of a
// trained model is near them).
// Only these functions are compiled with AVX512-BF16 (not the whole AVX512 copy, whose other code
// must run on AVX512 CPUs without it): the GEMM is entered once per matrix, through a call.
#define DMAX_BF16_DOT_INLINE DMAX_BF16_DOT_TARGET inline __attribute__((always_inline))

using Bits = uint16_t;  // a bf16 as its bits (c10::BFloat16's layout)
constexpr int64_t kDotCols = 32;  // weight columns per 512-bit load (one block)
// Tiles of up to 14 routed rows x one block (28 accumulators; row_passes splits an expert's rows
// evenly): its routed rows of a block (~10 on average, up to ~30) in one or two passes over each
// weight panel, where 5 rows x 2 blocks took two to six, each reloading and re-interleaving the
// panel (an llada2-small layer, cold weights: 0.62 -> 0.47 ms, docs/PERFORMANCE.md).
constexpr int kDotBlocks = 1;
constexpr int kDotRows = 14;
// Blocks per tile for experts of one routed row (a whole gate_up row of llada2-small in one pass;
// 64 one-row experts, cold: 0.81-0.83 -> 0.74-0.80 ms against 4, three alternated pairs) and of
// two (8 would spill).
constexpr int kWideBlocks1 = 8;
constexpr int kWideBlocks2 = 4;

// Within each 128-bit lane the unpacks interleave the lane's 4 low (lo) or 4 high (hi) columns of
// the two rows, so accumulator lane 4L + i holds column 8L + i (lo) or 8L + 4 + i (hi) of the
// block. The tiles keep that order in registers and permute on their way in and out of c (once
// per tile and panel, not per multiply-add).
alignas(64) constexpr int32_t kToLo[16] = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
alignas(64) constexpr int32_t kToHi[16] = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
alignas(64) constexpr int32_t kFrom0[16] = {0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23};
alignas(64) constexpr int32_t kFrom1[16] = {8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31};

// One block row of the weights: all 32 columns, or the `cols` ones of a tail block (zero past
// them; the masked load does not touch memory past the row).
template <bool kTail>
DMAX_BF16_DOT_INLINE __m512i load_block(const Bits* p, __mmask32 cols) {
  return kTail ? _mm512_maskz_loadu_epi16(cols, p) : _mm512_loadu_si512(p);
}

// c[0..32) (float32, column order) -> the (lo, hi) accumulators of the block, in unpack order.
template <bool kTail>
DMAX_BF16_DOT_INLINE void load_acc(const float* c, __mmask32 cols, __m512& lo, __m512& hi) {
  const __m512 c0 = kTail ? _mm512_maskz_loadu_ps(static_cast<__mmask16>(cols), c)
                          : _mm512_loadu_ps(c);
  const __m512 c1 = kTail ? _mm512_maskz_loadu_ps(static_cast<__mmask16>(cols >> 16), c + 16)
                          : _mm512_loadu_ps(c + 16);
  lo = _mm512_permutex2var_ps(c0, _mm512_load_si512(kToLo), c1);
  hi = _mm512_permutex2var_ps(c0, _mm512_load_si512(kToHi), c1);
}

template <bool kTail>
DMAX_BF16_DOT_INLINE void store_acc(float* c, __mmask32 cols, __m512 lo, __m512 hi) {
  const __m512 c0 = _mm512_permutex2var_ps(lo, _mm512_load_si512(kFrom0), hi);
  const __m512 c1 = _mm512_permutex2var_ps(lo, _mm512_load_si512(kFrom1), hi);
  if (kTail) {
    _mm512_mask_storeu_ps(c, static_cast<__mmask16>(cols), c0);
    _mm512_mask_storeu_ps(c + 16, static_cast<__mmask16>(cols >> 16), c1);
  } else {
    _mm512_storeu_ps(c, c0);
    _mm512_storeu_ps(c + 16, c1);
  }
}

// c[i, :NB 32] (+)= a[i, :K] @ b[:K, :NB 32] for i < MB: a bf16 rows of even stride lda (zero at
// a[i, K] when K is odd), b bf16 (row stride ldb), c float32 (row stride ldc). kTail: NB = 1 and
// only the `cols` columns exist. K odd (the matrix's last panel): the last row pairs with zeros.
// Not inlined into dot_rows: there GCC hoisted the permutation indices of load_acc / store_acc
// out of the row-tile loop, and the 4 registers they kept made it spill the weights.
template <int MB, int NB, bool kTail, class Pf>
DMAX_BF16_DOT_TARGET __attribute__((noinline)) void dot_tile(const Bits* a, int64_t lda, const Bits* b, int64_t ldb,
                                   int64_t K, float* c, int64_t ldc, bool accumulate,
                                   __mmask32 cols, Pf& prefetch) {
  static_assert(!kTail || NB == 1);
  __m512 lo[MB][NB], hi[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int v = 0; v < NB; ++v) {
      if (accumulate) {
        load_acc<kTail>(c + i * ldc + v * kDotCols, cols, lo[i][v], hi[i][v]);
      } else {
        lo[i][v] = hi[i][v] = _mm512_setzero_ps();
      }
    }
  Pf pf = prefetch;  // a local copy (prefetch.h)
  for (int64_t kk = 0; kk < K; kk += 2) {
    pf.step();
    const Bits* row = b + kk * ldb;
    const bool pair = kk + 1 < K;
    __m512i wl[NB], wh[NB];
    for (int v = 0; v < NB; ++v) {
      const __m512i r0 = load_block<kTail>(row + v * kDotCols, cols);
      const __m512i r1 = pair ? load_block<kTail>(row + ldb + v * kDotCols, cols)
                              : _mm512_setzero_si512();
      wl[v] = _mm512_unpacklo_epi16(r0, r1);
      wh[v] = _mm512_unpackhi_epi16(r0, r1);
    }
    for (int i = 0; i < MB; ++i) {
      int32_t two;  // a[i, kk..kk+1] (kk even: 4-byte aligned in the row)
      std::memcpy(&two, a + i * lda + kk, sizeof(two));
      const __m512bh xa = (__m512bh)_mm512_set1_epi32(two);
      for (int v = 0; v < NB; ++v) {
        lo[i][v] = _mm512_dpbf16_ps(lo[i][v], (__m512bh)wl[v], xa);
        hi[i][v] = _mm512_dpbf16_ps(hi[i][v], (__m512bh)wh[v], xa);
      }
    }
  }
  prefetch = pf;
  for (int i = 0; i < MB; ++i)
    for (int v = 0; v < NB; ++v) store_acc<kTail>(c + i * ldc + v * kDotCols, cols, lo[i][v], hi[i][v]);
}

template <int NB, bool kTail, class Pf>
DMAX_BF16_DOT_TARGET void dot_rows(const Bits* a, int64_t lda, int64_t m, const Bits* b,
                                   int64_t ldb, int64_t K, float* c, int64_t ldc, bool accumulate,
                                   __mmask32 cols, Pf& pf) {
  row_passes<kDotRows>(m, [&]<int MB>(int64_t i) {
    dot_tile<MB, NB, kTail>(a + i * lda, lda, b, ldb, K, c + i * ldc, ldc, accumulate, cols, pf);
  });
}

// c[:m, :n] = a[:m, :K] @ b[:K, :n] in dot products: gemm<T>'s panels and prefetch (see there),
// a bf16 with an even row stride lda >= K (zero at a[i, K] when K is odd). Panels of an even
// number of rows, so every panel but the last starts a k pair.
template <class Pf>
DMAX_BF16_DOT_TARGET void dot_gemm(const Bits* a, int64_t lda, int64_t m, int64_t K, const Bits* b,
                                   int64_t n, float* c, const Bits* then, int64_t then_n) {
  // 64 KB (float32 form: 32 KB): fewer panels, so fewer accumulator reloads and permutes, which
  // weigh more against dot products that do twice the work per instruction (llada2-small layer,
  // in L3: 1.27 -> 1.22 ms). The rows of one column tile (what the row tiles share) still fit L1.
  constexpr int64_t kPanelBytes = 64 * 1024;
  const int64_t row_bytes = n * static_cast<int64_t>(sizeof(Bits));
  const int64_t panel = std::max<int64_t>(2, kPanelBytes / row_bytes / 2 * 2);
  // An expert with one or two routed rows is a weight stream with little arithmetic: strips of
  // kWideBlocks1 / kWideBlocks2 blocks read each weight row in 1-4 passes, not one per 32 columns.
  const bool wide = m <= kWideRows;
  const int64_t strip = (wide ? (m == 1 ? kWideBlocks1 : kWideBlocks2) : kDotBlocks) * kDotCols;
  const int64_t tiles = n / strip + (n % strip + kDotCols - 1) / kDotCols;
  const int64_t steps_per_panel =
      std::max<int64_t>(1, tiles * ((m + kDotRows - 1) / kDotRows) * (panel / 2));
  for (int64_t k0 = 0; k0 < K; k0 += panel) {
    const int64_t kn = std::min(panel, K - k0);
    const bool accumulate = k0 > 0;
    const char* next = reinterpret_cast<const char*>(b + (k0 + kn) * n);
    int64_t next_lines = (std::min(panel, K - k0 - kn) * row_bytes + 63) / 64;
    if (k0 + kn >= K && then != nullptr) {  // the last panel: the next matrix's first one
      const int64_t then_row = then_n * static_cast<int64_t>(sizeof(Bits));
      next = reinterpret_cast<const char*>(then);
      next_lines = (std::max<int64_t>(1, kPanelBytes / then_row) * then_row + 63) / 64;
    }
    Pf pf{next, next + 64 * next_lines, (next_lines + steps_per_panel - 1) / steps_per_panel};
    const Bits* bp = b + k0 * n;
    int64_t j = 0;
    for (; wide && j + strip <= n; j += strip) {
      if (m == 1) {
        dot_tile<1, kWideBlocks1, false>(a + k0, lda, bp + j, n, kn, c + j, n, accumulate, ~0u, pf);
      } else {
        dot_tile<2, kWideBlocks2, false>(a + k0, lda, bp + j, n, kn, c + j, n, accumulate, ~0u, pf);
      }
    }
    for (; j + kDotBlocks * kDotCols <= n; j += kDotBlocks * kDotCols)
      dot_rows<kDotBlocks, false>(a + k0, lda, m, bp + j, n, kn, c + j, n, accumulate, ~0u, pf);
    for (; j + kDotCols <= n; j += kDotCols)
      dot_rows<1, false>(a + k0, lda, m, bp + j, n, kn, c + j, n, accumulate, ~0u, pf);
    if (j < n) {
      const __mmask32 cols = static_cast<__mmask32>((uint64_t{1} << (n - j)) - 1);
      dot_rows<1, true>(a + k0, lda, m, bp + j, n, kn, c + j, n, accumulate, cols, pf);
    }
  }
}
// ---- the same dot products over weights packed for them (moe_experts_kernel.h) ----
// b packed [n / 32, K / 2, 32, 2]: block column jb, k pair p, column c, row 2p + t. A block
// column's pairs are one contiguous stream (128 bytes a pair) that the hardware prefetchers
// follow, and a 512-bit load is already a pair-interleaved half block: no unpacks, and the
// accumulators hold columns in order (no permutes). Lane by lane the same vdpbf16ps on the same
// pairs in the same k order as dot_gemm: bitwise the same results.
constexpr int64_t kPairBits = 2 * kDotCols;  // a block column's bf16s per k pair
static_assert(kPackCols == kDotCols, "a packed block column is one dot-product block");

// c[i, :32] = a[i, :2 pairs] @ the block column at b, for i < MB. One flat accumulator array,
// pointers stepped, loops unrolled by pragma: written as dot_tile is, GCC kept a dead copy of
// every accumulator on the stack, stored at each pair (the kernel ran slower than dot_gemm's).
template <int MB, class Pf>
DMAX_BF16_DOT_TARGET __attribute__((noinline)) void packed_tile(const Bits* a, int64_t lda,
                                                               const Bits* b, int64_t pairs,
                                                               float* c, int64_t ldc,
                                                               Pf& prefetch) {
  __m512 acc[2 * MB];  // row i: columns 0..15, 16..31
#pragma GCC unroll 32
  for (int q = 0; q < 2 * MB; ++q) acc[q] = _mm512_setzero_ps();
  // The rows in groups of three from one pointer each (as skinny_linear's tiles address their
  // weight rows): 14 row offsets did not fit the general registers, and GCC reloaded them from
  // the stack at every step.
  constexpr int kGroups = (MB + 2) / 3;
  const char* base[kGroups];
#pragma GCC unroll 8
  for (int g = 0; g < kGroups; ++g) base[g] = reinterpret_cast<const char*>(a + 3 * g * lda);
  const int64_t row_bytes = lda * static_cast<int64_t>(sizeof(Bits));
  Pf pf = prefetch;  // a local copy (prefetch.h)
  for (int64_t p = 0; p < pairs; ++p, b += kPairBits) {
    pf.step();
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(b);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(b + kDotCols);
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) {
      int32_t two;  // a[i, 2p..2p+1]
      std::memcpy(&two, base[i / 3] + (i % 3) * row_bytes, sizeof(two));
      const __m512bh xa = (__m512bh)_mm512_set1_epi32(two);
      acc[2 * i] = _mm512_dpbf16_ps(acc[2 * i], w0, xa);
      acc[2 * i + 1] = _mm512_dpbf16_ps(acc[2 * i + 1], w1, xa);
    }
#pragma GCC unroll 8
    for (int g = 0; g < kGroups; ++g) base[g] += 2 * sizeof(Bits);
  }
  prefetch = pf;
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i) {
    _mm512_storeu_ps(c + i * ldc, acc[2 * i]);
    _mm512_storeu_ps(c + i * ldc + 16, acc[2 * i + 1]);
  }
}

// c[:m, :n] = a[:m, :K] @ b (packed, n % 32 == 0, K even), one block column (one stream) at a
// time: two a pass, tried for experts of up to 6 rows, made the block forward 2% slower. While a
// block column is computed, the next one (or `then`'s first, packed likewise, after the last)
// is prefetched: without it the forward was slower than dot_gemm's.
template <class Pf>
DMAX_BF16_DOT_TARGET void packed_gemm(const Bits* a, int64_t lda, int64_t m, int64_t K,
                                      const Bits* b, int64_t n, float* c, const Bits* then,
                                      int64_t then_K) {
  const int64_t pairs = K / 2, col_stride = pairs * kPairBits, cols = n / kDotCols;
  const int64_t steps = pairs * ((m + kDotRows - 1) / kDotRows);
  for (int64_t jb = 0; jb < cols; ++jb) {
    const Bits* bj = b + jb * col_stride;
    const Bits* next = jb + 1 < cols ? bj + col_stride : then;
    const int64_t next_bytes = (jb + 1 < cols ? col_stride : then_K / 2 * kPairBits) *
                               static_cast<int64_t>(sizeof(Bits));
    const int64_t lines = next == nullptr ? 0 : next_bytes / 64;
    const char* from = reinterpret_cast<const char*>(next);
    Pf pf{from, from + 64 * lines, (lines + steps - 1) / steps};
    float* cj = c + jb * kDotCols;
    row_passes<kDotRows>(m, [&]<int MB>(int64_t i) {
      packed_tile<MB>(a + i * lda, lda, bj, pairs, cj + i * n, n, pf);
    });
  }
}
#undef DMAX_BF16_DOT_INLINE
#undef DMAX_BF16_DOT_TARGET
#endif  // CPU_CAPABILITY_AVX512

// hidden[i, :I] = r(r(silu(r(g))) * r(u)) for [g | u] = gu[i, :2I] (float32 GEMM output), r()
// rounding to T as the torch formulation does; stored as Out (float32, or the bf16 the dot
// products read) at row stride ldh.
template <class T, class Out>
void swiglu_rows(const float* gu, int64_t m, int64_t I, Out* hidden, int64_t ldh) {
  const auto swiglu = [&](const float* g_row, int64_t j, int64_t n) {
    return swiglu_lanes<T>(round_to<T>(Vec::loadu(g_row + j, n)),
                           round_to<T>(Vec::loadu(g_row + I + j, n)));
  };
  for (int64_t i = 0; i < m; ++i) {
    const float* g_row = gu + i * 2 * I;
    Out* h_row = hidden + i * ldh;
    int64_t j = 0;
    if constexpr (std::is_same_v<T, Out>) {  // whole pairs of vectors: one store each
      for (; j + 2 * kW <= I; j += 2 * kW)
        store_rounded_pair(swiglu(g_row, j, kW), swiglu(g_row, j + kW, kW), h_row + j);
    }
    for (; j < I; j += kW) {
      const int64_t n = std::min(kW, I - j);
      store_from_float<Out>(swiglu(g_row, j, n), h_row + j, n);
    }
  }
}

// y[i, :H] (float32 GEMM output) rounded to T, to the routed slot's out row.
template <class T>
void store_outputs(const ExpertTask<T>& task, const float* y) {
  const int64_t H = task.H;
  for (int64_t i = 0; i < task.m; ++i) {
    const float* y_row = y + i * H;
    T* out = task.out_rows[i];
    int64_t j = 0;
    for (; j + 2 * kW <= H; j += 2 * kW)
      store_rounded_pair(round_to<T>(Vec::loadu(y_row + j)),
                         round_to<T>(Vec::loadu(y_row + j + kW)), out + j);
    for (; j < H; j += kW) {
      const int64_t n = std::min(kW, H - j);
      store_from_float(Vec::loadu(y_row + j, n), out + j, n);
    }
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// moe_expert_ffn for bf16 in dot products: the routed rows copied as they are, the hidden stored
// in bf16 (its values are bf16 already), each in rows of even length (zero-padded) so that the
// k pairs of the last panel stay inside them.
template <class Pf>
void expert_ffn_bf16_dot(const ExpertTask<c10::BFloat16>& task) {
  using BF16 = c10::BFloat16;
  const int64_t m = task.m, H = task.H, I = task.I;
  const int64_t ldx = H + H % 2, ldh = I + I % 2;
  // The float32 form's scratch regions; bf16 rows of even length fit in them.
  BF16* xs = reinterpret_cast<BF16*>(task.scratch);            // [m, ldx]
  float* gu = task.scratch + m * H;                            // [m, 2I]
  BF16* hidden = reinterpret_cast<BF16*>(gu + m * 2 * I);      // [m, ldh]
  float* y = gu + m * 3 * I;                                   // [m, H]
  for (int64_t i = 0; i < m; ++i) {
    std::memcpy(xs + i * ldx, task.x + task.rows[i] * H, H * sizeof(BF16));
    if (ldx > H) xs[i * ldx + H] = BF16(0.f);
  }
  const auto bits = [](const BF16* p) { return reinterpret_cast<const Bits*>(p); };
  if (task.packed) {
    packed_gemm<Pf>(bits(xs), ldx, m, H, bits(task.gate_up), 2 * I, gu, bits(task.down), I);
  } else {
    dot_gemm<Pf>(bits(xs), ldx, m, H, bits(task.gate_up), 2 * I, gu, bits(task.down), H);
  }
  swiglu_rows<BF16>(gu, m, I, hidden, ldh);
  if (ldh > I)
    for (int64_t i = 0; i < m; ++i) hidden[i * ldh + I] = BF16(0.f);
  if (task.packed) {
    packed_gemm<Pf>(bits(hidden), ldh, m, I, bits(task.down), H, y, bits(task.next_gate_up), H);
  } else {
    dot_gemm<Pf>(bits(hidden), ldh, m, I, bits(task.down), H, y, bits(task.next_gate_up), 2 * I);
  }
  store_outputs(task, y);
}
#endif

// moe_expert_ffn with the prefetch hint Pf (prefetch.h).
template <class T, class Pf>
void expert_ffn(const ExpertTask<T>& task) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (task.bf16_dot) return expert_ffn_bf16_dot<Pf>(task);
  }
#endif
  const int64_t m = task.m, H = task.H, I = task.I;
  float* xs = task.scratch;            // [m, H]: the routed rows in float32
  float* gu = xs + m * H;              // [m, 2I]
  float* hidden = gu + m * 2 * I;      // [m, I]
  float* y = hidden + m * I;           // [m, H]
  for (int64_t i = 0; i < m; ++i) {
    const T* src = task.x + task.rows[i] * H;
    for (int64_t j = 0; j < H; j += kW) {
      const int64_t n = std::min(kW, H - j);
      load_float(src + j, n).store(xs + i * H + j, n);
    }
  }
  gemm<T, Pf>(xs, m, H, task.gate_up, 2 * I, gu, task.down, H);
  swiglu_rows<T>(gu, m, I, hidden, I);
  gemm<T, Pf>(hidden, m, I, task.down, H, y, task.next_gate_up, 2 * I);
  store_outputs(task, y);
}

}  // namespace

template <class T>
void moe_expert_ffn(const ExpertTask<T>& task) {
  with_prefetcher(task.nta_prefetch, [&]<class Pf>() { expert_ffn<T, Pf>(task); });
}

template <class T>
void moe_combine_rows(const CombineTask<T>& task, int64_t begin, int64_t end) {
  const int64_t k = task.k, H = task.H;
  for (int64_t r = begin; r < end; ++r) {
    const T* y = task.y + r * k * H;
    const float* w = task.weights + r * k;
    T* out = task.out + r * H;
    const auto weighted_sum = [&](int64_t j, int64_t n) {
      Vec acc(0.f);
      for (int64_t s = 0; s < k; ++s) acc = acc + Vec(w[s]) * load_float(y + s * H + j, n);
      return acc;
    };
    int64_t j = 0;
    for (; j + 2 * kW <= H; j += 2 * kW)
      store_rounded_pair(round_to<T>(weighted_sum(j, kW)), round_to<T>(weighted_sum(j + kW, kW)),
                         out + j);
    for (; j < H; j += kW) {
      const int64_t n = std::min(kW, H - j);
      store_from_float(weighted_sum(j, n), out + j, n);
    }
  }
}

void moe_pack_pairs(const uint16_t* w, int64_t K, int64_t N, uint32_t* out, int64_t begin,
                    int64_t end) {
  const int64_t pairs = K / 2;
  for (int64_t r = begin; r < end; ++r) {  // r = e * pairs + p: rows 2p, 2p + 1 of expert e
    const int64_t e = r / pairs, p = r % pairs;
    const uint16_t* row0 = w + (e * K + 2 * p) * N;
    const uint16_t* row1 = row0 + N;
    uint32_t* dst = out + e * pairs * N + p * kPackCols;  // block column 0's pair p
    // Column j's place: its block column's pair p.
    const auto at = [&](int64_t j) {
      return dst + j / kPackCols * pairs * kPackCols + j % kPackCols;
    };
    int64_t j = 0;
    // (row0[j], row1[j]) as one 32-bit lane, low half first: columns stay in order, so 16 (8)
    // consecutive columns of a block column are one store.
#if defined(CPU_CAPABILITY_AVX512)
    for (; j + 16 <= N; j += 16) {
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(row0 + j)));
      const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(row1 + j)));
      _mm512_storeu_si512(at(j), _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
#elif defined(CPU_CAPABILITY_AVX2)
    for (; j + 8 <= N; j += 8) {
      const __m256i lo = _mm256_cvtepu16_epi32(_mm_loadu_si128(
          reinterpret_cast<const __m128i*>(row0 + j)));
      const __m256i hi = _mm256_cvtepu16_epi32(_mm_loadu_si128(
          reinterpret_cast<const __m128i*>(row1 + j)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(at(j)),
                          _mm256_or_si256(lo, _mm256_slli_epi32(hi, 16)));
    }
#endif
    for (; j < N; ++j)
      *at(j) = row0[j] | static_cast<uint32_t>(row1[j]) << 16;
  }
}

template void moe_expert_ffn<float>(const ExpertTask<float>&);
template void moe_expert_ffn<c10::Half>(const ExpertTask<c10::Half>&);
template void moe_expert_ffn<c10::BFloat16>(const ExpertTask<c10::BFloat16>&);
template void moe_combine_rows<float>(const CombineTask<float>&, int64_t, int64_t);
template void moe_combine_rows<c10::Half>(const CombineTask<c10::Half>&, int64_t, int64_t);
template void moe_combine_rows<c10::BFloat16>(const CombineTask<c10::BFloat16>&, int64_t, int64_t);

}  // namespace dmax::cpu::CPU_CAPABILITY
