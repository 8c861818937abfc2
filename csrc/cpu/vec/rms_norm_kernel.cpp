// dmax.rms_norm / dmax.qk_norm_rotary on the CPU, one row at a time (compiled once per CPU
// capability, see rms_norm_kernel.h). The torch formulation of a decoding block's RMSNorm is 7
// ops (and the rotary 6 more) on a few kilobytes each: their dispatch and allocations cost more
// than the arithmetic, which here is two passes over the row.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "cpu/vec/load_float.h"
#include "cpu/vec/rms_norm_kernel.h"

namespace dmax::cpu::CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();

}  // namespace

template <class T>
void rms_norm_row(const NormRow<T>& row) {
  const int64_t H = row.H;
  Vec acc(0.f);
  for (int64_t j = 0; j < H; j += kW) {
    const Vec v = load_float(row.x + j, std::min(kW, H - j));  // zeros past H
    acc = acc + v * v;
  }
  const float mean =
      at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, acc) / H;
  const Vec inv_rms(1.f / std::sqrt(mean + row.eps));
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

template void rms_norm_row<float>(const NormRow<float>&);
template void rms_norm_row<c10::Half>(const NormRow<c10::Half>&);
template void rms_norm_row<c10::BFloat16>(const NormRow<c10::BFloat16>&);

}  // namespace dmax::cpu::CPU_CAPABILITY
