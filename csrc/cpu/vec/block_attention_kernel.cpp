// dmax.block_attention on the CPU, one key-value head of one sequence per call (compiled once per
// CPU capability, see block_attention_kernel.h). A decoding block is 32 queries per head against
// a few hundred cached keys: 0.1-0.5 ms of arithmetic per layer, where SDPA's CPU kernels spent
// 2-4x that on tiling and dispatch. The head's keys are transposed and its values copied into
// float32 scratch once and reused by all its group x T query rows; scores for register tiles of
// 4 rows x 4 key vectors, softmax on the row, then P @ V for 4 rows x 4 value vectors.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "cpu/vec/bf16_dot_target.h"
#include "cpu/vec/block_attention_kernel.h"
#include "cpu/vec/exp_nonpositive.h"
#include "cpu/vec/load_float.h"
#include "cpu/vec/transpose.h"

namespace dmax::cpu::CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
constexpr int kRows = 4;  // query rows per register tile
constexpr int kVecs = 4;  // key (or value) vectors per register tile

// out[c * ld_out + s] = row s's element c for s < S, c < C: 32-bit elements; row(s, c0, n) loads
// elements [c0, c0 + n) of row s as a vector (float32, or other 32-bit words as float bits). Blocks of 16 rows x 16 columns
// transposed in registers on the AVX512 copy: element by element, the stores' stride (a row of
// the transposed cache) made packing a layer's keys ~10 us, a tenth of the op.
template <class Row>
inline void transpose_rows(int64_t S, int64_t C, Row&& row, float* out, int64_t ld_out) {
  int64_t s0 = 0;
#if defined(CPU_CAPABILITY_AVX512)
  if (C % 16 == 0) {
    for (; s0 + 16 <= S; s0 += 16) {
      for (int64_t c0 = 0; c0 < C; c0 += 16) {
        __m512 r[16];
        for (int q = 0; q < 16; ++q) r[q] = row(s0 + q, c0, 16);
        transpose_16x16(r);
        for (int c = 0; c < 16; ++c) _mm512_storeu_ps(out + (c0 + c) * ld_out + s0, r[c]);
      }
    }
  }
#endif
  for (int64_t s = s0; s < S; ++s) {
    for (int64_t c0 = 0; c0 < C; c0 += kW) {
      const int64_t n = std::min(kW, C - c0);
      float tmp[kW];
      Vec(row(s, c0, n)).store(tmp);
      for (int64_t c = 0; c < n; ++c) out[(c0 + c) * ld_out + s] = tmp[c];
    }
  }
}

// scores[i, c0 : c0 + NV kW] = q[i] . kt[:, c0 : ...] for i < R (q rows of D, kt [D, Sp]), plus
// the rows' bias.
template <int R, int NV>
inline void score_tile(const float* q, int64_t D, const float* kt, int64_t Sp, int64_t c0,
                       const float* const* bias, float* scores) {
  Vec acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = Vec::loadu(bias[i] + c0 + j * kW);
  for (int64_t d = 0; d < D; ++d) {
    Vec kv[NV];
    for (int j = 0; j < NV; ++j) kv[j] = Vec::loadu(kt + d * Sp + c0 + j * kW);
    for (int i = 0; i < R; ++i) {
      const Vec qa(q[i * D + d]);
      for (int j = 0; j < NV; ++j) acc[i][j] = at::vec::fmadd(qa, kv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j].store(scores + i * Sp + c0 + j * kW);
}

template <int R>
void score_rows(const float* q, int64_t D, const float* kt, int64_t Sp, const float* const* bias,
                float* scores) {
  int64_t c0 = 0;
  for (; c0 + kVecs * kW <= Sp; c0 += kVecs * kW)
    score_tile<R, kVecs>(q, D, kt, Sp, c0, bias, scores);
  for (; c0 < Sp; c0 += kW) score_tile<R, 1>(q, D, kt, Sp, c0, bias, scores);
}

// The row's softmax numerators in place (exp(x - max), 0 where the bias is -inf); returns
// 1 / their sum, or 0 when the row may attend nothing.
float softmax_numerators(float* row, int64_t Sp) {
  // Four running maxima: at::vec::maximum's NaN test puts ~8 cycles on one chain a vector.
  constexpr int kChains = 4;
  Vec vmax[kChains];
  for (auto& v : vmax) v = Vec(-std::numeric_limits<float>::infinity());
  int64_t s0 = 0;
  for (; s0 + kChains * kW <= Sp; s0 += kChains * kW)
    for (int c = 0; c < kChains; ++c)
      vmax[c] = at::vec::maximum(vmax[c], Vec::loadu(row + s0 + c * kW));
  for (; s0 < Sp; s0 += kW) vmax[0] = at::vec::maximum(vmax[0], Vec::loadu(row + s0));
  for (int c = 1; c < kChains; ++c) vmax[0] = at::vec::maximum(vmax[0], vmax[c]);
  const float m = at::vec::vec_reduce_all<float>(
      [](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, vmax[0]);
  if (m == -std::numeric_limits<float>::infinity()) {
    std::fill(row, row + Sp, 0.f);
    return 0.f;
  }
  const Vec vm(m), neg_inf(-std::numeric_limits<float>::infinity()), zero(0.f);
  Vec sum(0.f);
  for (int64_t s = 0; s < Sp; s += kW) {
    // exp_nonpositive counts exp(-inf) as e^-87: a masked slot (-inf) keeps p = 0 exactly.
    const Vec x = Vec::loadu(row + s);
    const Vec p = Vec::blendv(exp_nonpositive(x - vm), zero, x == neg_inf);
    p.store(row + s);
    sum = sum + p;
  }
  return 1.f / at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return a + b; },
                                              sum);
}

// out rows i < R (T, row pointers out[i], D wide) = inv[i] * sum_s p[i, s] v[s, :] over the
// value columns [d0, d0 + NV kW) (v [S, Dp], the last vector possibly partial: n_last lanes).
template <class T, int R, int NV>
inline void value_tile(const float* p, int64_t Sp, const float* v, int64_t S, int64_t Dp,
                       int64_t d0, int64_t n_last, const float* inv, T* const* out) {
  Vec acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = Vec(0.f);
  for (int64_t s = 0; s < S; ++s) {
    Vec vv[NV];
    for (int j = 0; j < NV; ++j) vv[j] = Vec::loadu(v + s * Dp + d0 + j * kW);
    for (int i = 0; i < R; ++i) {
      const Vec pa(p[i * Sp + s]);
      for (int j = 0; j < NV; ++j) acc[i][j] = at::vec::fmadd(pa, vv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NV; ++j)
      store_from_float(acc[i][j] * Vec(inv[i]), out[i] + d0 + j * kW,
                       j == NV - 1 ? n_last : kW);
}

template <class T, int R>
void value_rows(const float* p, int64_t Sp, const float* v, int64_t S, int64_t D, int64_t Dp,
                const float* inv, T* const* out) {
  int64_t d0 = 0;
  for (; d0 + kVecs * kW <= D; d0 += kVecs * kW)
    value_tile<T, R, kVecs>(p, Sp, v, S, Dp, d0, kW, inv, out);
  for (; d0 < D; d0 += kW)
    value_tile<T, R, 1>(p, Sp, v, S, Dp, d0, std::min(kW, D - d0), inv, out);
}

// R query rows starting at row r0 (row r = h * T_rows + t): scores, softmax, P @ V, stored.
template <class T, int R>
void attend_rows(const AttentionHead<T>& a, const float* kt, const float* v, const float* q,
                 float* scores, int64_t Sp, int64_t Dp, int64_t r0) {
  const float* bias[R];
  T* out[R];
  float inv[R];
  for (int i = 0; i < R; ++i) {
    const int64_t h = (r0 + i) / a.T_rows, t = (r0 + i) % a.T_rows;
    bias[i] = a.bias + t * Sp;
    out[i] = a.out + t * a.out_row_stride + h * a.D;
  }
  score_rows<R>(q + r0 * a.D, a.D, kt, Sp, bias, scores);
  for (int i = 0; i < R; ++i) inv[i] = softmax_numerators(scores + i * Sp, Sp);
  value_rows<T, R>(scores, Sp, v, a.S, a.D, Dp, inv, out);
}


#if defined(CPU_CAPABILITY_AVX512)
// ---- bf16 with AVX512-BF16: pairs of bf16 in 32-bit slots, vdpbf16ps (half the FMAs) ----------
// kp [D/2, Sp]: kp[j, s] = (k[s, 2j], k[s, 2j+1]); vp [Sp/2, D]: vp[i, d] = (v[2i, d], v[2i+1, d]);
// q pairs are read in place from q's rows; p is rounded to bf16 pairs per row (pp [4, Sp/2]).

// scores[i, c0 : c0 + NV 16] = scale * q[i] . k[c0 : ...] + bias[i] for i < R.
template <int R, int NV>
DMAX_BF16_DOT_TARGET __attribute__((noinline)) void dot_score_tile(
    const uint32_t* const* q, int64_t half_d, const uint32_t* kp, int64_t Sp, int64_t c0,
    float scale, const float* const* bias, float* scores) {
  __m512 acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t d = 0; d < half_d; ++d) {
    __m512i kv[NV];
    for (int j = 0; j < NV; ++j) kv[j] = _mm512_loadu_si512(kp + d * Sp + c0 + j * 16);
    for (int i = 0; i < R; ++i) {
      const __m512bh qa = (__m512bh)_mm512_set1_epi32(static_cast<int>(q[i][d]));
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], qa, (__m512bh)kv[j]);
    }
  }
  const __m512 vs = _mm512_set1_ps(scale);
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NV; ++j)
      _mm512_storeu_ps(scores + i * Sp + c0 + j * 16,
                       _mm512_fmadd_ps(acc[i][j], vs, _mm512_loadu_ps(bias[i] + c0 + j * 16)));
}

// out rows i < R = inv[i] * sum_s p[i, s] v[s, d0 : d0 + NV 16], rounded to bf16.
template <int R, int NV>
DMAX_BF16_DOT_TARGET __attribute__((noinline)) void dot_value_tile(
    const uint32_t* pp, int64_t half_sp, const uint32_t* vp, int64_t D, int64_t d0,
    const float* inv, c10::BFloat16* const* out) {
  __m512 acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t s = 0; s < half_sp; ++s) {
    __m512i vv[NV];
    for (int j = 0; j < NV; ++j) vv[j] = _mm512_loadu_si512(vp + s * D + d0 + j * 16);
    for (int i = 0; i < R; ++i) {
      const __m512bh pa = (__m512bh)_mm512_set1_epi32(static_cast<int>(pp[i * half_sp + s]));
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], pa, (__m512bh)vv[j]);
    }
  }
  for (int i = 0; i < R; ++i) {
    const auto scaled = [&](int j) {
      return round_to<c10::BFloat16>(Vec(_mm512_mul_ps(acc[i][j], _mm512_set1_ps(inv[i]))));
    };
    int j = 0;
    for (; j + 1 < NV; j += 2) store_rounded_pair(scaled(j), scaled(j + 1), out[i] + d0 + j * 16);
    if (j < NV) store_from_float(scaled(j), out[i] + d0 + j * 16, 16);
  }
}

// p rounded to bf16 pairs: pp[j] = (p[2j], p[2j+1]) for j < Sp / 2 (Sp a multiple of 32 or 16).
DMAX_BF16_DOT_TARGET void pack_probs(const float* p, int64_t Sp, uint32_t* pp) {
  int64_t s = 0;
  for (; s + 32 <= Sp; s += 32) {
    const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + s + 16), _mm512_loadu_ps(p + s));
    _mm512_storeu_si512(pp + s / 2, (__m512i)b);
  }
  if (s < Sp) {  // 16 left
    const __m256bh b = _mm512_cvtneps_pbh(_mm512_loadu_ps(p + s));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(pp + s / 2), (__m256i)b);
  }
}

// vp[i, d] = (v[2i, d], v[2i+1, d]) for 32 columns d0..d0+31 of rows a (2i) and b (2i+1).
DMAX_BF16_DOT_TARGET void pack_value_pairs(const uint16_t* a, const uint16_t* b, uint32_t* out) {
  static const __m512i lo = _mm512_set_epi16(
      47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
      39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  static const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  const __m512i va = _mm512_loadu_si512(a), vb = _mm512_loadu_si512(b);
  _mm512_storeu_si512(out, _mm512_permutex2var_epi16(va, lo, vb));
  _mm512_storeu_si512(out + 16, _mm512_permutex2var_epi16(va, hi, vb));
}

template <int R>
void dot_attend_rows(const AttentionHead<c10::BFloat16>& a, const uint32_t* kp,
                     const uint32_t* vp, float* scores, uint32_t* pp, int64_t Sp, int64_t r0) {
  const uint32_t* q[R];
  const float* bias[R];
  c10::BFloat16* out[R];
  float inv[R];
  for (int i = 0; i < R; ++i) {
    const int64_t h = (r0 + i) / a.T_rows, t = (r0 + i) % a.T_rows;
    q[i] = reinterpret_cast<const uint32_t*>(a.q + h * a.q_head_stride + t * a.q_row_stride);
    bias[i] = a.bias + t * Sp;
    out[i] = a.out + t * a.out_row_stride + h * a.D;
  }
  const int64_t half_d = a.D / 2, half_sp = Sp / 2;
  int64_t c0 = 0;
  for (; c0 + kVecs * 16 <= Sp; c0 += kVecs * 16)
    dot_score_tile<R, kVecs>(q, half_d, kp, Sp, c0, a.scale, bias, scores);
  for (; c0 < Sp; c0 += 16) dot_score_tile<R, 1>(q, half_d, kp, Sp, c0, a.scale, bias, scores);
  for (int i = 0; i < R; ++i) {
    inv[i] = softmax_numerators(scores + i * Sp, Sp);
    pack_probs(scores + i * Sp, Sp, pp + i * half_sp);
  }
  for (int64_t d0 = 0; d0 < a.D; d0 += kVecs * 16)  // D a multiple of 32
    if (d0 + kVecs * 16 <= a.D)
      dot_value_tile<R, kVecs>(pp, half_sp, vp, a.D, d0, inv, out);
    else
      dot_value_tile<R, 2>(pp, half_sp, vp, a.D, d0, inv, out);
}

void dot_attention_head(const AttentionHead<c10::BFloat16>& a) {
  const int64_t S = a.S, D = a.D, Sp = round_up_16(S), half_d = D / 2;
  const int64_t rows = a.group * a.T_rows;
  auto* kp = reinterpret_cast<uint32_t*>(a.scratch);  // [D/2, Sp]
  uint32_t* vp = kp + half_d * Sp;                      // [Sp/2, D]
  auto* scores = reinterpret_cast<float*>(vp + Sp / 2 * D);  // [kRows, Sp]
  uint32_t* pp = reinterpret_cast<uint32_t*>(scores + kRows * Sp);  // [kRows, Sp/2]
  transpose_rows(S, half_d, [&](int64_t s, int64_t j0, int64_t n) {  // pairs as float bits
    return Vec::loadu(reinterpret_cast<const float*>(a.k + s * a.k_row_stride) + j0, n);
  }, reinterpret_cast<float*>(kp), Sp);
  for (int64_t j = 0; j < half_d; ++j) std::fill(kp + j * Sp + S, kp + (j + 1) * Sp, 0u);
  std::vector<uint16_t> zeros(D, 0);
  for (int64_t i = 0; i < Sp / 2; ++i) {
    const auto row = [&](int64_t s) {
      return s < S ? reinterpret_cast<const uint16_t*>(a.v + s * a.v_row_stride) : zeros.data();
    };
    for (int64_t d0 = 0; d0 < D; d0 += 32)
      pack_value_pairs(row(2 * i) + d0, row(2 * i + 1) + d0, vp + i * D + d0);
  }
  int64_t r0 = 0;
  for (; r0 + kRows <= rows; r0 += kRows) dot_attend_rows<kRows>(a, kp, vp, scores, pp, Sp, r0);
  switch (rows - r0) {
    case 1: dot_attend_rows<1>(a, kp, vp, scores, pp, Sp, r0); break;
    case 2: dot_attend_rows<2>(a, kp, vp, scores, pp, Sp, r0); break;
    case 3: dot_attend_rows<3>(a, kp, vp, scores, pp, Sp, r0); break;
    default: break;
  }
}
#endif  // CPU_CAPABILITY_AVX512

}  // namespace

template <class T>
void block_attention_head(const AttentionHead<T>& a) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (a.bf16_dot && block_attention_dot_shape<T>(a.D)) return dot_attention_head(a);
  }
#endif
  const int64_t S = a.S, D = a.D, Sp = round_up_16(S), Dp = round_up_16(D);
  const int64_t rows = a.group * a.T_rows;
  float* kt = a.scratch;        // [D, Sp]
  float* v = kt + D * Sp;       // [S, Dp]
  float* q = v + S * Dp;        // [rows, D], times the scale
  float* scores = q + rows * D; // [kRows, Sp]
  transpose_rows(S, D, [&](int64_t s, int64_t d0, int64_t n) {
    return load_float(a.k + s * a.k_row_stride + d0, n);
  }, kt, Sp);
  for (int64_t s = 0; s < S; ++s) {
    const T* v_row = a.v + s * a.v_row_stride;
    for (int64_t d = 0; d < Dp; d += kW) {
      const int64_t n = std::min(kW, D - d);
      (n > 0 ? load_float(v_row + d, n) : Vec(0.f)).store(v + s * Dp + d);
    }
  }
  for (int64_t d = 0; d < D; ++d) std::fill(kt + d * Sp + S, kt + (d + 1) * Sp, 0.f);
  const Vec scale(a.scale);
  for (int64_t r = 0; r < rows; ++r) {
    const T* q_row = a.q + (r / a.T_rows) * a.q_head_stride + (r % a.T_rows) * a.q_row_stride;
    for (int64_t d = 0; d < D; d += kW) {
      const int64_t n = std::min(kW, D - d);
      (load_float(q_row + d, n) * scale).store(q + r * D + d, n);
    }
  }
  int64_t r0 = 0;
  for (; r0 + kRows <= rows; r0 += kRows) attend_rows<T, kRows>(a, kt, v, q, scores, Sp, Dp, r0);
  switch (rows - r0) {
    case 1: attend_rows<T, 1>(a, kt, v, q, scores, Sp, Dp, r0); break;
    case 2: attend_rows<T, 2>(a, kt, v, q, scores, Sp, Dp, r0); break;
    case 3: attend_rows<T, 3>(a, kt, v, q, scores, Sp, Dp, r0); break;
    default: break;
  }
}

template void block_attention_head<float>(const AttentionHead<float>&);
template void block_attention_head<c10::Half>(const AttentionHead<c10::Half>&);
template void block_attention_head<c10::BFloat16>(const AttentionHead<c10::BFloat16>&);

}  // namespace dmax::cpu::CPU_CAPABILITY
