// dmax.rms_norm / dmax.qk_norm_rotary on the CPU, a batch of rows at a time (compiled once per CPU
// capability, see rms_norm_kernel.h). The torch formulation of a decoding block's RMSNorm is 7
// ops (and the rotary 6 more) on a few kilobytes each: their dispatch and allocations cost more
// than the arithmetic, which here is two passes over the row.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>

#include "cpu/vec/load_float.h"
#include "cpu/vec/rms_norm_kernel.h"

namespace dmax::cpu::CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();

// A head's vectors kept in registers by the whole-vector path's rotary (head dims up to 128).
constexpr int64_t kMaxHeadVecs = 8;

// kW elements of T as float32, whole vectors only (no count branch).
template <class T>
inline Vec load_whole(const T* p) {
  return load_float(p, kW);
}

// 1 / sqrt(mean(x^2) + eps), summed vector by vector (zeros past H), then across the lanes.
template <class T>
inline float inverse_rms(const T* x, int64_t H, float eps) {
  Vec acc(0.f);
  for (int64_t j = 0; j < H; j += kW) {
    const Vec v = load_float(x + j, std::min(kW, H - j));
    acc = acc + v * v;
  }
  const float mean =
      at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, acc) / H;
  return 1.f / std::sqrt(mean + eps);
}

// The normed, weighted head of N whole vectors with its rotary (`rotary` vectors, an even count)
// in registers: N a template parameter so that the loops unroll and y[] is never memory.
template <class T, int N>
void rotary_head(const NormRow<T>& row, const Vec& inv_rms) {
  Vec y[N], out[N];
  const int64_t rotary = row.R / kW, half = rotary / 2;
#pragma GCC unroll 8
  for (int v = 0; v < N; ++v) {
    const Vec normed = round_to<T>(load_whole(row.x + v * kW) * inv_rms);
    y[v] = round_to<T>(load_whole(row.weight + v * kW) * normed);
  }
#pragma GCC unroll 8
  for (int v = 0; v < N; ++v) {
    if (v < rotary) {
      const Vec rot = v < half ? y[v + half].neg() : y[v - half];
      const Vec a = round_to<T>(y[v] * load_whole(row.cos + v * kW));
      const Vec b = round_to<T>(rot * load_whole(row.sin + v * kW));
      out[v] = round_to<T>(a + b);
    } else {
      out[v] = y[v];
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v + 1 < N; v += 2) store_rounded_pair(out[v], out[v + 1], row.out + v * kW);
  if constexpr (N % 2) store_from_float(out[N - 1], row.out + (N - 1) * kW, kW);
}

// write_row for rows of whole vectors (H % kW == 0) and, with a rotary, rotary halves of whole
// vectors and at most kMaxHeadVecs vectors: the same operations in the same order as the general
// path, a head's rotary in registers rather than through scratch.
template <class T>
void write_whole_row(const NormRow<T>& row, const Vec& inv_rms) {
  const int64_t H = row.H;
  if (row.cos == nullptr) {
    const auto normed = [&](int64_t j) {
      return round_to<T>(load_whole(row.weight + j) * round_to<T>(load_whole(row.x + j) * inv_rms));
    };
    int64_t j = 0;
    for (; j + 2 * kW <= H; j += 2 * kW) store_rounded_pair(normed(j), normed(j + kW), row.out + j);
    if (j < H) store_from_float(normed(j), row.out + j, kW);
    return;
  }
  [&]<int... N>(std::integer_sequence<int, N...>) {
    ((H == (N + 1) * kW ? (rotary_head<T, N + 1>(row, inv_rms), 0) : 0), ...);
  }(std::make_integer_sequence<int, kMaxHeadVecs>{});
}

// y = T(weight * T(x * inv_rms)) and the rotary to row.out, any H and R.
template <class T>
void write_row(const NormRow<T>& row, const Vec& inv_rms) {
  const int64_t H = row.H;
  if (H % kW == 0 && (row.cos == nullptr
                      || (row.R % (2 * kW) == 0 && H <= kMaxHeadVecs * kW))) {
    return write_whole_row(row, inv_rms);
  }
  const bool rotary = row.cos != nullptr;
  for (int64_t j = 0; j < H; j += kW) {
    const int64_t n = std::min(kW, H - j);
    const Vec normed = round_to<T>(load_float(row.x + j, n) * inv_rms);
    const Vec y = round_to<T>(load_float(row.weight + j, n) * normed);
    if (rotary) {
      y.store(row.scratch + j, n);
    } else {
      store_from_float(y, row.out + j, n);
    }
  }
  if (!rotary) return;
  // The rotary on whole vectors (per-element bf16 conversions made it most of the op's time):
  // rot = (-y[R/2:R], y[:R/2]) built in scratch[H, H + R), then one pass over the first R dims.
  const float* y = row.scratch;
  float* rot = row.scratch + H;
  const int64_t R = row.R, half = R / 2;
  for (int64_t j = 0; j < half; j += kW) {
    const int64_t n = std::min(kW, half - j);
    Vec::loadu(y + half + j, n).neg().store(rot + j, n);
    Vec::loadu(y + j, n).store(rot + half + j, n);
  }
  for (int64_t j = 0; j < R; j += kW) {
    const int64_t n = std::min(kW, R - j);
    const Vec a = round_to<T>(Vec::loadu(y + j, n) * load_float(row.cos + j, n));
    const Vec b = round_to<T>(Vec::loadu(rot + j, n) * load_float(row.sin + j, n));
    store_from_float(a + b, row.out + j, n);
  }
  for (int64_t j = R; j < H; j += kW) {
    const int64_t n = std::min(kW, H - j);
    store_from_float(Vec::loadu(y + j, n), row.out + j, n);
  }
}

}  // namespace

template <class T>
void rms_norm_rows(const NormRow<T>* rows, int64_t count) {
  // Each row's scale is a chain of dependent steps (the sums, the lanes' sum, a square root, a
  // division: ~80 cycles) ahead of a few vectors of output for a head: the scales of a batch of
  // rows first, as independent chains, then the rows (llada2-small bf16 q|k heads of 64, 32
  // tokens: 13.7 -> 10.3 us a call).
  constexpr int64_t kBatch = 16;
  float inv_rms[kBatch];
  for (int64_t r0 = 0; r0 < count; r0 += kBatch) {
    const int64_t n = std::min(kBatch, count - r0);
    for (int64_t i = 0; i < n; ++i)
      inv_rms[i] = inverse_rms(rows[r0 + i].x, rows[r0 + i].H, rows[r0 + i].eps);
    for (int64_t i = 0; i < n; ++i) write_row(rows[r0 + i], Vec(inv_rms[i]));
  }
}

template void rms_norm_rows<float>(const NormRow<float>*, int64_t);
template void rms_norm_rows<c10::Half>(const NormRow<c10::Half>*, int64_t);
template void rms_norm_rows<c10::BFloat16>(const NormRow<c10::BFloat16>*, int64_t);

}  // namespace dmax::cpu::CPU_CAPABILITY
