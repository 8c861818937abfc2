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

#include "cpu/vec/block_attention_kernel.h"
#include "cpu/vec/load_float.h"

namespace dmax::cpu::CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
constexpr int kRows = 4;  // query rows per register tile
constexpr int kVecs = 4;  // key (or value) vectors per register tile

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
  Vec vmax(-std::numeric_limits<float>::infinity());
  for (int64_t s = 0; s < Sp; s += kW) vmax = at::vec::maximum(vmax, Vec::loadu(row + s));
  const float m = at::vec::vec_reduce_all<float>(
      [](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, vmax);
  if (m == -std::numeric_limits<float>::infinity()) {
    std::fill(row, row + Sp, 0.f);
    return 0.f;
  }
  const Vec vm(m);
  Vec sum(0.f);
  for (int64_t s = 0; s < Sp; s += kW) {
    const Vec p = (Vec::loadu(row + s) - vm).exp_u20();  // exp(-inf) = 0
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

}  // namespace

template <class T>
void block_attention_head(const AttentionHead<T>& a) {
  const int64_t S = a.S, D = a.D, Sp = round_up_16(S), Dp = round_up_16(D);
  const int64_t rows = a.group * a.T_rows;
  float* kt = a.scratch;        // [D, Sp]
  float* v = kt + D * Sp;       // [S, Dp]
  float* q = v + S * Dp;        // [rows, D], times the scale
  float* scores = q + rows * D; // [kRows, Sp]
  for (int64_t s = 0; s < S; ++s) {
    const T* k_row = a.k + s * a.k_row_stride;
    const T* v_row = a.v + s * a.v_row_stride;
    for (int64_t d = 0; d < D; ++d) kt[d * Sp + s] = static_cast<float>(k_row[d]);
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
