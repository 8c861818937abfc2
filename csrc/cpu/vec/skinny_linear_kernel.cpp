// dmax.skinny_linear on the CPU, a range of output columns at a time (compiled once per CPU
// capability, see skinny_linear_kernel.h). A decoding block's projection multiplies a few rows of
// activations (32 tokens) by a weight read once: the GEMM library packs that weight for every
// float32 call (the llada2-small lm_head ran at half the machine's float32 peak). Here the weight
// is read in place: a register tile of kTileRows weight rows by two vectors of activation rows,
// one weight element broadcast against the transposed activations per multiply-add, while the
// next tile's rows are prefetched. bfloat16 on CPUs with AVX512-BF16 (AVX512 copy only): the
// same tiles with vdpbf16ps on pairs of k (below). Other 16-bit cases go to the library (AMX)
// as weight @ x^T; the transpose of that product back to [M, N] is here too.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "cpu/vec/bf16_dot_target.h"
#include "cpu/vec/load_float.h"
#include "cpu/vec/prefetch.h"
#include "cpu/vec/skinny_linear_kernel.h"
#include "cpu/vec/transpose.h"

namespace dmax::cpu::CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kTileRows = 12;  // 12 weight rows x 2 vectors = 24 accumulators of 32 zmm registers
#else
constexpr int kTileRows = 6;   // 6 x 2 = 12 accumulators of 16 ymm registers
#endif
constexpr int64_t kMaxVecs = 2;
constexpr int64_t kSumBlock = 128;

// c[i, :NV kW] = w[i, :K] @ xt[:K, :NV kW] for i < kTileRows: w float32 (row stride K), xt
// float32 (row stride ldx), c float32 [kTileRows, NV kW]. Sums in k order.
// c[i, :NV kW] (+)= w[i, :K] @ xt[:K, :NV kW] for i < kTileRows: w float32 (row stride ldw), xt
// float32 (row stride ldx), c float32 [kTileRows, NV kW]; the sum over K (from zero, in k order)
// is added onto c when `accumulate`.
// The rows are addressed as groups of three from one pointer each (base, base + K, base + 2K):
// twelve row pointers do not fit the general registers next to the loop's own, and GCC reloaded
// them from the stack at every step.
template <int NV, class Pf>
inline void tile(const float* xt, int64_t ldx, const float* w, int64_t ldw, int64_t K,
                 float* c, bool accumulate, Pf& prefetch) {
  static_assert(kTileRows % 3 == 0);
  constexpr int kGroups = kTileRows / 3;
  Vec acc[kTileRows][NV];
  for (int i = 0; i < kTileRows; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = Vec(0.f);
  const char* base[kGroups];
  for (int g = 0; g < kGroups; ++g) base[g] = reinterpret_cast<const char*>(w + 3 * g * ldw);
  const int64_t row_bytes = ldw * static_cast<int64_t>(sizeof(float));
  for (int64_t k = 0; k < K; ++k) {
    prefetch.step();
    Vec xv[NV];
    for (int v = 0; v < NV; ++v) xv[v] = Vec::loadu(xt + k * ldx + v * kW);
    for (int g = 0; g < kGroups; ++g) {
      for (int j = 0; j < 3; ++j) {
        const Vec wb(*reinterpret_cast<const float*>(base[g] + j * row_bytes));
        for (int v = 0; v < NV; ++v)
          acc[3 * g + j][v] = at::vec::fmadd(wb, xv[v], acc[3 * g + j][v]);
      }
      base[g] += sizeof(float);
    }
  }
  for (int i = 0; i < kTileRows; ++i)
    for (int v = 0; v < NV; ++v) {
      float* ci = c + (i * NV + v) * kW;
      (accumulate ? Vec::loadu(ci) + acc[i][v] : acc[i][v]).store(ci);
    }
}

#if defined(CPU_CAPABILITY_AVX512)
// bfloat16 with AVX512-BF16 (vdpbf16ps: 16 lanes, each the sum of two bf16 products added in
// float32 onto an accumulator). The float32 kernel's form with pairs of k for elements: the
// activations packed as [ceil(K/2), Mp] pairs (x[m, 2p], x[m, 2p + 1]), one weight pair
// w[n, 2p : 2p + 2] broadcast against them, so the lanes are the rows of x and no horizontal
// sums are needed; the weight is still read in place. Only this copy has these functions, each
// with the target attribute: the capability's flags lack -mavx512bf16 (other AVX512 CPUs do).

// The weight pair at p (two bf16, the low half first) as a 32-bit word, without an aliasing
// cast: GCC folds the load into the dot product's broadcast operand.
struct WeightPair {
  static inline uint32_t load(const char* p) {
    uint32_t v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
};
// The last element of an odd K alone in the low half (xt's high half is zero there): reading
// the pair would touch the next row, or past the end of the weight.
struct WeightLast {
  static inline uint32_t load(const char* p) {
    uint16_t v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
};

// The vector width of the dot products. Zmm: 16 rows of x per vector, two vectors. Ymm, for the
// last 16 rows or fewer: a zmm broadcast of the weight pair costs a shuffle beside its load, and
// a tile of one zmm per weight row was bound by them (M = 8 ran at 42 GFLOP/s); a ymm broadcast
// is a plain load, and Zen 4 runs two ymm vdpbf16ps per cycle.
struct Zmm {
  using F = __m512;
  using BH = __m512bh;
  static constexpr int kLanes = 16;
  DMAX_BF16_DOT_TARGET static F zero() { return _mm512_setzero_ps(); }
  DMAX_BF16_DOT_TARGET static BH load(const uint32_t* p) { return (BH)_mm512_loadu_si512(p); }
  DMAX_BF16_DOT_TARGET static BH broadcast(uint32_t v) { return (BH)_mm512_set1_epi32(v); }
  DMAX_BF16_DOT_TARGET static F dot(F acc, BH a, BH b) { return _mm512_dpbf16_ps(acc, a, b); }
  // 32 bf16: lo's lanes, then hi's.
  DMAX_BF16_DOT_TARGET static __m512i to_bf16(F lo, F hi) {
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
  }
};
struct Ymm {
  using F = __m256;
  using BH = __m256bh;
  static constexpr int kLanes = 8;
  DMAX_BF16_DOT_TARGET static F zero() { return _mm256_setzero_ps(); }
  DMAX_BF16_DOT_TARGET static BH load(const uint32_t* p) {
    return (BH)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
  DMAX_BF16_DOT_TARGET static BH broadcast(uint32_t v) { return (BH)_mm256_set1_epi32(v); }
  DMAX_BF16_DOT_TARGET static F dot(F acc, BH a, BH b) { return _mm256_dpbf16_ps(acc, a, b); }
  // 16 bf16: lo's lanes, then hi's; zeros after them.
  DMAX_BF16_DOT_TARGET static __m512i to_bf16(F lo, F hi) {
    return _mm512_zextsi256_si512((__m256i)_mm256_cvtne2ps_pbh(hi, lo));
  }
};

// acc[i][v] += the pair products of weight row i (base[i / 3] + (i % 3) row_bytes) with the
// pairs xp[v lanes : (v + 1) lanes]; the row pointers move to the next pair.
template <class V, int NV, class Load>
DMAX_BF16_DOT_TARGET inline void dot_step(typename V::F (&acc)[kTileRows][NV], const uint32_t* xp,
                                      const char* (&base)[kTileRows / 3], int64_t row_bytes) {
  typename V::BH xv[NV];
  for (int v = 0; v < NV; ++v) xv[v] = V::load(xp + v * V::kLanes);
  for (int g = 0; g < kTileRows / 3; ++g) {
    for (int j = 0; j < 3; ++j) {
      const typename V::BH wb = V::broadcast(Load::load(base[g] + j * row_bytes));
      for (int v = 0; v < NV; ++v) acc[3 * g + j][v] = V::dot(acc[3 * g + j][v], wb, xv[v]);
    }
    base[g] += 2 * sizeof(uint16_t);
  }
}

// c[i] = bf16: w[i, :K] @ xt[:, v lanes + mm] for lane mm of vector v < NV, then zeros, for
// i < kTileRows: w bf16 (row stride ldw elements), xt pairs (row stride ldx), float32 sums in k
// order rounded once to bf16. Rows in groups of three per pointer, as in tile(). Not inlined:
// with its three forms in one function GCC kept the 1-vector form's accumulators on the stack
// (a store-to-load chain per step, M = 8 at 17 instead of 6 cycles a step).
template <class V, int NV, class Pf>
DMAX_BF16_DOT_TARGET __attribute__((noinline)) void tile_bf16(const uint32_t* xt, int64_t ldx, const uint16_t* w,
                                       int64_t ldw, int64_t K, __m512i* c,
                                       Pf& prefetch) {
  static_assert(kTileRows % 3 == 0 && NV >= 1 && NV * V::kLanes <= 32);
  typename V::F acc[kTileRows][NV];
  for (int i = 0; i < kTileRows; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = V::zero();
  const char* base[kTileRows / 3];
  for (int g = 0; g < kTileRows / 3; ++g)
    base[g] = reinterpret_cast<const char*>(w + 3 * g * ldw);
  const int64_t row_bytes = ldw * static_cast<int64_t>(sizeof(uint16_t));
  const int64_t pairs = K / 2;
  Pf pf = prefetch;  // a local copy (prefetch.h)
  for (int64_t p = 0; p < pairs; ++p) {
    pf.step();
    dot_step<V, NV, WeightPair>(acc, xt + p * ldx, base, row_bytes);
  }
  prefetch = pf;
  if (K % 2) dot_step<V, NV, WeightLast>(acc, xt + pairs * ldx, base, row_bytes);
  for (int i = 0; i < kTileRows; ++i) {
    if constexpr (NV == 2) {
      c[i] = V::to_bf16(acc[i][0], acc[i][1]);
    } else {
      c[i] = V::to_bf16(acc[i][0], V::zero());
    }
  }
}

// 16-bit lane indices for vpermw: the low halves of the 16 words of one vector, then their high
// halves.
alignas(64) constexpr uint16_t kSplitHalves[32] = {
    0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
    1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};

// product (16 bf16 values as float32) + the bf16 row res (its `cols` lanes), rounded to bf16 as
// torch rounds (load_float.h's round_to): the bf16s in the high halves of the words.
DMAX_BF16_DOT_TARGET inline __m512i add_residual_bf16(__m512 product, const uint16_t* res,
                                                      __mmask16 cols) {
  const __m512i r = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(cols, res)),
                                      16);
  return _mm512_castps_si512(static_cast<__m512>(
      round_to<c10::BFloat16>(Vec(_mm512_add_ps(product, _mm512_castsi512_ps(r))))));
}

// out[m0 + mm, n] = c[n, mm] (+ res[mm, n] with kResidual) for n < rows, mm < m_count: c 16 rows
// of 32 bf16 (16 pairs), out and res bf16 with row stride ldo, from their (m0, 0). The pairs
// transposed as a 16 x 16 float32 block (bits only), so word n of vector q holds (row 2q, row
// 2q + 1) of column n; one vpermw puts each row's 16 bf16 in one half of a vector, each half
// stored with a mask, or, when `wide`, whole: the 16 - rows columns past the tile's get zeros,
// which the thread's next tile overwrites. On the Zen 5 of docs/PERFORMANCE.md, the masked
// narrowing stores (vpmovdw to memory) took most of the lm_head's store time; plain stores made
// it 2% faster (28 of 30 interleaved rounds).
template <bool kResidual>
DMAX_BF16_DOT_TARGET inline void store_transposed_bf16(const __m512i* c, int64_t rows,
                                                   int64_t m_count, uint16_t* out,
                                                   int64_t ldo, const uint16_t* res, bool wide) {
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_castsi512_ps(c[i]);
  transpose_16x16(r);
  const __mmask16 cols = static_cast<__mmask16>((1u << rows) - 1);
  const __m512i split = _mm512_load_si512(kSplitHalves);
  const __m512i high_halves = _mm512_load_si512(kHighHalvesOfTwo);
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t q = 0; 2 * q < m_count; ++q) {
    const __m512i pairs = _mm512_castps_si512(r[q]);
    const int64_t m = 2 * q;
    const bool second = m + 1 < m_count;
    __m512i two_rows;  // row m's 16 bf16, then row m + 1's
    if constexpr (kResidual) {
      const __m512i lo = add_residual_bf16(_mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)),
                                           res + m * ldo, cols);
      const __m512i hi = second ? add_residual_bf16(_mm512_castsi512_ps(
                                                        _mm512_and_si512(pairs, high)),
                                                    res + (m + 1) * ldo, cols)
                                : _mm512_setzero_si512();
      two_rows = _mm512_permutex2var_epi16(lo, high_halves, hi);
    } else {
      two_rows = _mm512_permutexvar_epi16(split, pairs);
    }
    if (wide) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * ldo),
                          _mm512_castsi512_si256(two_rows));
      if (second)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (m + 1) * ldo),
                            _mm512_extracti64x4_epi64(two_rows, 1));
    } else {
      _mm256_mask_storeu_epi16(out + m * ldo, cols, _mm512_castsi512_si256(two_rows));
      if (second)
        _mm256_mask_storeu_epi16(out + (m + 1) * ldo, cols,
                                 _mm512_extracti64x4_epi64(two_rows, 1));
    }
  }
}
#endif

}  // namespace

int64_t skinny_linear_tile_rows() { return kTileRows; }

void skinny_linear_pack(const float* x, int64_t M, int64_t K, int64_t Mp, float* xt) {
  int64_t m0 = 0;
#if defined(CPU_CAPABILITY_AVX512)
  // 16 x 16 blocks in registers: element by element, the rows' power-of-two stride made every
  // access a conflict miss (20 us for 32 x 512, more than a small projection's arithmetic).
  for (; m0 + 16 <= M; m0 += 16) {
    int64_t k0 = 0;
    for (; k0 + 16 <= K; k0 += 16) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(x + (m0 + i) * K + k0);
      transpose_16x16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(xt + (k0 + i) * Mp + m0, r[i]);
    }
    for (; k0 < K; ++k0)
      for (int64_t i = 0; i < 16; ++i) xt[k0 * Mp + m0 + i] = x[(m0 + i) * K + k0];
  }
#endif
  for (; m0 < M; ++m0)
    for (int64_t k = 0; k < K; ++k) xt[k * Mp + m0] = x[m0 * K + k];
  for (int64_t k = 0; k < K; ++k) std::fill(xt + k * Mp + M, xt + (k + 1) * Mp, 0.f);
}

namespace {
// skinny_linear_columns with the prefetch hint Pf (prefetch.h).
template <class Pf>
void columns_float(const SkinnyLinearTask& task, int64_t begin, int64_t end) {
  const int64_t K = task.K, Mp = task.Mp, M = task.M, N = task.N;
  // The last tile's rows, zero-padded to a whole tile.
  std::vector<float> rows;
  alignas(64) float c[kTileRows * kMaxVecs * kW];
  for (int64_t n0 = begin; n0 < end; n0 += kTileRows) {
    const int64_t r = std::min<int64_t>(kTileRows, end - n0);
    const float* w = task.weight + n0 * K;
    if (r < kTileRows) {
      rows.assign(kTileRows * K, 0.f);
      std::copy(w, w + r * K, rows.begin());
      w = rows.data();
    }
    // The next tile's rows come in while this one computes (its first vector pass only).
    const int64_t next_rows = std::clamp<int64_t>(end - n0 - r, 0, kTileRows);
    const char* next = reinterpret_cast<const char*>(task.weight + (n0 + r) * K);
    const int64_t lines = (next_rows * K * static_cast<int64_t>(sizeof(float)) + 63) / 64;
    Pf prefetch{next, next + 64 * lines, (lines + K - 1) / K};
    for (int64_t m0 = 0; m0 < Mp; m0 += kMaxVecs * kW) {
      const int64_t nv = std::min<int64_t>(kMaxVecs, (Mp - m0) / kW);
      // Partial sums over blocks of kSumBlock terms, added up in order: a float32 sum's
      // rounding error grows with its length (one sum over K = 1408 was 2.6x the library's).
      for (int64_t k0 = 0; k0 < K; k0 += kSumBlock) {
        const int64_t kn = std::min(kSumBlock, K - k0);
        const float* xt = task.xt + k0 * Mp + m0;
        if (nv == 2) {
          tile<2>(xt, Mp, w + k0, K, kn, c, k0 > 0, prefetch);
        } else {
          tile<1>(xt, Mp, w + k0, K, kn, c, k0 > 0, prefetch);
        }
      }
      // c[i, mm] is out[m0 + mm, n0 + i]: a transposed store, a few floats at a time.
      const int64_t m_end = std::min(M, m0 + nv * kW);
      for (int64_t m = m0; m < m_end; ++m) {
        float* o = task.out + m * N + n0;
        const float* ci = c + (m - m0);
        if (task.residual == nullptr) {
          for (int64_t i = 0; i < r; ++i) o[i] = ci[i * nv * kW];
        } else {
          const float* res = task.residual + m * N + n0;
          for (int64_t i = 0; i < r; ++i) o[i] = ci[i * nv * kW] + res[i];
        }
      }
    }
  }
}
}  // namespace

void skinny_linear_columns(const SkinnyLinearTask& task, int64_t begin, int64_t end) {
  with_prefetcher(task.nta_prefetch, [&]<class Pf>() { columns_float<Pf>(task, begin, end); });
}

#if defined(CPU_CAPABILITY_AVX512)
namespace {
// kResidual: task.residual is added (a template parameter: no residual branch in the lm_head's
// stores).
template <class Pf, bool kResidual>
DMAX_BF16_DOT_TARGET void columns_bf16(const SkinnyLinearBf16Task& task, int64_t begin, int64_t end) {
  const int64_t K = task.K, Mp = task.Mp, M = task.M, N = task.N;
  std::vector<uint16_t> rows;  // the last tile's rows, zero-padded to a whole tile
  // Rows kTileRows..15 of the 16 x 16 transposed block stay zero (never stored).
  __m512i c[16];
  for (auto& ci : c) ci = _mm512_setzero_si512();
  for (int64_t n0 = begin; n0 < end; n0 += kTileRows) {
    const int64_t r = std::min<int64_t>(kTileRows, end - n0);
    const uint16_t* w = task.weight + n0 * K;
    if (r < kTileRows) {
      rows.assign(kTileRows * K, 0);
      std::copy(w, w + r * K, rows.begin());
      w = rows.data();
    }
    // The next tile's rows come in during this one's first pass over the activations.
    const int64_t next_rows = std::clamp<int64_t>(end - n0 - r, 0, kTileRows);
    const char* next = reinterpret_cast<const char*>(task.weight + (n0 + r) * K);
    const int64_t lines = (next_rows * K * static_cast<int64_t>(sizeof(uint16_t)) + 63) / 64;
    const int64_t steps = std::max<int64_t>(1, K / 2);
    Pf prefetch{next, next + 64 * lines, (lines + steps - 1) / steps};
    for (int64_t m0 = 0; m0 < M; m0 += kMaxVecs * kW) {
      const int64_t rows_left = M - m0;
      if (rows_left > 2 * Ymm::kLanes) {
        tile_bf16<Zmm, 2>(task.xt + m0, Mp, w, K, K, c, prefetch);
      } else if (rows_left > Ymm::kLanes) {
        tile_bf16<Ymm, 2>(task.xt + m0, Mp, w, K, K, c, prefetch);
      } else {
        tile_bf16<Ymm, 1>(task.xt + m0, Mp, w, K, K, c, prefetch);
      }
      store_transposed_bf16<kResidual>(c, r, std::min<int64_t>(rows_left, kMaxVecs * kW),
                                       task.out + m0 * N + n0, N,
                                       kResidual ? task.residual + m0 * N + n0 : nullptr,
                                       !kResidual && n0 + 16 <= end);
    }
  }
}
}  // namespace

// Declared without the target attribute (GCC would take two differently targeted declarations
// for function versions): the caller has checked the CPU.
void skinny_linear_bf16_columns(const SkinnyLinearBf16Task& task, int64_t begin, int64_t end) {
  with_prefetcher(task.nta_prefetch, [&]<class Pf>() {
    if (task.residual != nullptr) {
      columns_bf16<Pf, true>(task, begin, end);
    } else {
      columns_bf16<Pf, false>(task, begin, end);
    }
  });
}
#endif

void transpose_16bit(const uint16_t* in, int64_t N, int64_t M, uint16_t* out, int64_t begin,
                     int64_t end) {
  int64_t n0 = begin;
#if defined(CPU_CAPABILITY_AVX512)
  // 16 rows of `in` x 32 columns as a 16 x 16 block of column pairs (32-bit), transposed in
  // registers: pair c of the 16 rows, low halves -> out row 2c, high halves -> out row 2c + 1.
  // (A gather per pair cost 20 ns each here: 0.6 ms for a [32768, 32] product.)
  if (M % 32 == 0) {
    for (; n0 + 16 <= end; n0 += 16) {
      for (int64_t m0 = 0; m0 < M; m0 += 32) {
        __m512 r[16];
        for (int i = 0; i < 16; ++i)
          r[i] = _mm512_castsi512_ps(_mm512_loadu_si512(in + (n0 + i) * M + m0));
        transpose_16x16(r);
        for (int c = 0; c < 16; ++c) {
          const __m512i pairs = _mm512_castps_si512(r[c]);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (m0 + 2 * c) * N + n0),
                              _mm512_cvtepi32_epi16(pairs));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (m0 + 2 * c + 1) * N + n0),
                              _mm512_cvtepi32_epi16(_mm512_srli_epi32(pairs, 16)));
        }
      }
    }
  }
#endif
  // Blocks of 64 rows: their M columns stay in L1 while each out row takes 64 elements.
  constexpr int64_t kBlock = 64;
  for (; n0 < end; n0 += kBlock) {
    const int64_t nn = std::min(kBlock, end - n0);
    for (int64_t m = 0; m < M; ++m) {
      uint16_t* o = out + m * N + n0;
      const uint16_t* i = in + n0 * M + m;
      for (int64_t n = 0; n < nn; ++n) o[n] = i[n * M];
    }
  }
}

}  // namespace dmax::cpu::CPU_CAPABILITY
