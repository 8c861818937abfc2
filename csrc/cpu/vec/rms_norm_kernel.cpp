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
  const float* y = row.scratch;
  const int64_t R = row.R, half = R / 2;
  for (int64_t j = 0; j < R; ++j) {
    const float rot = j < half ? -y[j + half] : y[j - half];
    const float a = static_cast<float>(static_cast<T>(y[j] * static_cast<float>(row.cos[j])));
    const float b = static_cast<float>(static_cast<T>(rot * static_cast<float>(row.sin[j])));
    row.out[j] = static_cast<T>(a + b);
  }
  for (int64_t j = R; j < H; ++j) row.out[j] = static_cast<T>(y[j]);
}

template void rms_norm_row<float>(const NormRow<float>&);
template void rms_norm_row<c10::Half>(const NormRow<c10::Half>&);
template void rms_norm_row<c10::BFloat16>(const NormRow<c10::BFloat16>&);

}  // namespace dmax::cpu::CPU_CAPABILITY
