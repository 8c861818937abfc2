// dmax.moe_experts on the CPU, one expert at a time (compiled once per CPU capability, see
// moe_experts_kernel.h). A block forward routes a few rows to each expert (32 tokens x 8 slots over
// 64..256 experts), so an expert's FFN is a skinny GEMM pair that reads each weight once: it is
// bound by streaming the weights, not by FLOPs. Register-blocked tiles of MB rows x NV vectors,
// float32 FMAs on weights converted in registers (bf16 -> f32 is a shift), one pass over each
// weight column tile per MB rows.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif
#include <type_traits>

#include "cpu/vec/moe_experts_kernel.h"
#include "cpu/vec/load_float.h"
#include "cpu/vec/prefetch.h"

namespace dmax::cpu::CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kVecs = 4;  // kRows x 4 accumulators + 4 weight vectors of 32 zmm registers
#else
constexpr int kVecs = 2;  // kRows x 2 accumulators + 2 weight vectors of 16 ymm registers
#endif
// Rows per register tile. 16-bit weights: one tile row fewer on AVX512, else GCC spills the
// accumulators (the conversions need registers of their own).
template <class T>
constexpr int kRows = std::is_same_v<T, float> ? (kVecs == 4 ? 6 : 4) : (kVecs == 4 ? 5 : 4);


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
template <class T, int MB, int NV>
inline void gemm_tile(const float* a, int64_t lda, const T* b, int64_t ldb, int64_t K, float* c,
                      int64_t ldc, bool accumulate, Prefetcher& prefetch) {
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

template <class T, int NV>
void gemm_rows(const float* a, int64_t lda, int64_t m, const T* b, int64_t ldb, int64_t K,
               float* c, int64_t ldc, bool accumulate, Prefetcher& pf) {
  int64_t i = 0;
  for (; i + kRows<T> <= m; i += kRows<T>)
    gemm_tile<T, kRows<T>, NV>(a + i * lda, lda, b, ldb, K, c + i * ldc, ldc, accumulate, pf);
  const float* ai = a + i * lda;
  float* ci = c + i * ldc;
  switch (m - i) {  // the remaining rows, as one smaller tile
    case 1: gemm_tile<T, 1, NV>(ai, lda, b, ldb, K, ci, ldc, accumulate, pf); break;
    case 2: gemm_tile<T, 2, NV>(ai, lda, b, ldb, K, ci, ldc, accumulate, pf); break;
    case 3: gemm_tile<T, 3, NV>(ai, lda, b, ldb, K, ci, ldc, accumulate, pf); break;
#if defined(CPU_CAPABILITY_AVX512)
    case 4: gemm_tile<T, 4, NV>(ai, lda, b, ldb, K, ci, ldc, accumulate, pf); break;
    case 5: gemm_tile<T, 5, NV>(ai, lda, b, ldb, K, ci, ldc, accumulate, pf); break;
#endif
    default: break;  // 0 (m - i < kRows<T>)
  }
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
template <class T>
void gemm(const float* a, int64_t m, int64_t K, const T* b, int64_t n, float* c,
          const T* then, int64_t then_n) {
  // 32 KB: each panel row block is reused by every row tile while in L1 / L2, and the tiles
  // reload their accumulators once per panel (16 KB: every 8 rows of down's [128, 512]; 32 KB
  // made an llada2-small layer's experts 1.35 -> 1.14 ms with hot weights, float32).
  constexpr int64_t kPanelBytes = 32 * 1024;
  const int64_t panel = std::max<int64_t>(1, kPanelBytes / (n * static_cast<int64_t>(sizeof(T))));
  const int64_t full = n / kW * kW;
  const int64_t tiles = full / (kVecs * kW) + full % (kVecs * kW) / kW;
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
    Prefetcher pf{next, next + 64 * next_lines, (next_lines + steps_per_panel - 1) / steps_per_panel};
    int64_t j = 0;
    for (; j + kVecs * kW <= full; j += kVecs * kW)
      gemm_rows<T, kVecs>(a + k0, K, m, b + k0 * n + j, n, kn, c + j, n, accumulate, pf);
    for (; j < full; j += kW)
      gemm_rows<T, 1>(a + k0, K, m, b + k0 * n + j, n, kn, c + j, n, accumulate, pf);
  }
  if (full < n) gemm_tail(a, m, K, b, n, full, c, false);
}



}  // namespace

template <class T>
void moe_expert_ffn(const ExpertTask<T>& task) {
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
  gemm<T>(xs, m, H, task.gate_up, 2 * I, gu, task.down, H);
  const Vec one(1.f);
  for (int64_t i = 0; i < m; ++i) {
    const float* g_row = gu + i * 2 * I;
    for (int64_t j = 0; j < I; j += kW) {
      const int64_t n = std::min(kW, I - j);
      const Vec g = round_to<T>(Vec::loadu(g_row + j, n));
      const Vec u = round_to<T>(Vec::loadu(g_row + I + j, n));
      const Vec silu = round_to<T>(g / (one + g.neg().exp()));  // torch's silu kernel
      round_to<T>(silu * u).store(hidden + i * I + j, n);
    }
  }
  gemm<T>(hidden, m, I, task.down, H, y, task.next_gate_up, 2 * I);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < H; j += kW) {
      const int64_t n = std::min(kW, H - j);
      round_to<T>(Vec::loadu(y + i * H + j, n)).store(task.out_rows[i] + j, n);
    }
  }
}

template <class T>
void moe_combine_rows(const CombineTask<T>& task, int64_t begin, int64_t end) {
  const int64_t k = task.k, H = task.H;
  for (int64_t r = begin; r < end; ++r) {
    const float* y = task.y + r * k * H;
    const float* w = task.weights + r * k;
    T* out = task.out + r * H;
    for (int64_t j = 0; j < H; j += kW) {
      const int64_t n = std::min(kW, H - j);
      Vec acc(0.f);
      for (int64_t s = 0; s < k; ++s) acc = acc + Vec(w[s]) * Vec::loadu(y + s * H + j, n);
      if constexpr (std::is_same_v<T, float>) {
        acc.store(out + j, n);
      } else {
        T tmp[kW];
        at::vec::convert_from_float<T>(acc, acc).store(tmp, kW);
        std::memcpy(out + j, tmp, n * sizeof(T));
      }
    }
  }
}

template void moe_expert_ffn<float>(const ExpertTask<float>&);
template void moe_expert_ffn<c10::Half>(const ExpertTask<c10::Half>&);
template void moe_expert_ffn<c10::BFloat16>(const ExpertTask<c10::BFloat16>&);
template void moe_combine_rows<float>(const CombineTask<float>&, int64_t, int64_t);
template void moe_combine_rows<c10::Half>(const CombineTask<c10::Half>&, int64_t, int64_t);
template void moe_combine_rows<c10::BFloat16>(const CombineTask<c10::BFloat16>&, int64_t, int64_t);

}  // namespace dmax::cpu::CPU_CAPABILITY
