// dmax.hybrid_embed on the CPU, one soft position (compiled once per CPU capability, see
// hybrid_embed_kernel.h). Two passes over H in float32 vectors: pass 1 loads the k top-k rows
// (converted to float32 in registers), mixes h with the mask row, accumulates |E[t_i]|^2 and
// |h|^2, and keeps h in an L1-resident buffer; pass 2 scales it and stores in the model dtype.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <array>
#include <cmath>
#include <type_traits>

#include "common/spd_checks.h"
#include "cpu/vec/hybrid_embed_kernel.h"
#include "cpu/vec/load_float.h"

namespace dmax::cpu::CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();

float reduce_add(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, v);
}

}  // namespace

template <class T>
void hybrid_embed_soft_row(const SoftRow<T>& row) {
  const int64_t H = row.H, k = row.k;
  std::array<const T*, checks::kMaxTopK> rows{};
  float p_sum = 0.f;
  for (int64_t i = 0; i < k; ++i) {
    rows[i] = row.weight + row.topk_ids[i] * row.weight_stride;
    p_sum += row.probs[i];
  }
  const float p_mask = 1.f - p_sum;
  std::array<Vec, checks::kMaxTopK> row_sq;
  row_sq.fill(Vec(0.f));
  Vec h_sq(0.f);
  for (int64_t j = 0; j < H; j += kW) {
    const int64_t n = std::min(kW, H - j);
    Vec h(0.f);
    for (int64_t i = 0; i < k; ++i) {  // the reference's order: sum_i p_i r_i, then the mask
      const Vec r = load_float(rows[i] + j, n);
      h = h + Vec(row.probs[i]) * r;
      row_sq[i] = row_sq[i] + r * r;
    }
    h = h + Vec(p_mask) * Vec::loadu(row.mask_row + j, n);
    h_sq = h_sq + h * h;
    h.store(row.scratch + j, n);
  }
  float target = p_mask * row.mask_norm;
  for (int64_t i = 0; i < k; ++i) target += row.probs[i] * std::sqrt(reduce_add(row_sq[i]));
  const Vec scale(target / (std::sqrt(reduce_add(h_sq)) + 1e-6f));
  int64_t j = 0;
  for (; j + 2 * kW <= H; j += 2 * kW)
    store_rounded_pair(round_to<T>(Vec::loadu(row.scratch + j) * scale),
                       round_to<T>(Vec::loadu(row.scratch + j + kW) * scale), row.out + j);
  for (; j < H; j += kW) {
    const int64_t n = std::min(kW, H - j);
    store_from_float(Vec::loadu(row.scratch + j, n) * scale, row.out + j, n);
  }
}

template void hybrid_embed_soft_row<float>(const SoftRow<float>&);
template void hybrid_embed_soft_row<c10::Half>(const SoftRow<c10::Half>&);
template void hybrid_embed_soft_row<c10::BFloat16>(const SoftRow<c10::BFloat16>&);

}  // namespace dmax::cpu::CPU_CAPABILITY
