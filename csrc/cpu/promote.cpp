// CPU promote: which masked positions take their prediction (SPEC step 3 and the hard-threshold
// baseline). One sequence at a time, parallel over the batch.
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>

#include "common/spd_checks.h"
#include "ops_cpu.h"

namespace dmax::cpu {
namespace {

// SPD: masked positions before the first masked one with conf < thr, else the first masked one.
void promote_prefix_row(const int64_t* ids, const float* conf, int64_t L, float thr,
                        int64_t mask_id, bool* out) {
  int64_t first_masked = L, first_low = L;
  for (int64_t l = 0; l < L; ++l) {
    if (ids[l] != mask_id) continue;
    if (first_masked == L) first_masked = l;
    if (conf[l] < thr) {
      first_low = l;
      break;
    }
  }
  const int64_t cutoff = std::max(first_low, first_masked + 1);
  for (int64_t l = 0; l < L; ++l) out[l] = ids[l] == mask_id && l < cutoff;
}

// Baseline: eligible with conf >= thr, or when none is, eligible within 1e-5 of the best.
void promote_threshold_row(const int64_t* ids, const float* conf, const int64_t* pred, int64_t L,
                           float thr, int64_t mask_id, bool* out) {
  bool any_above = false;
  float best = -std::numeric_limits<float>::infinity();
  for (int64_t l = 0; l < L; ++l) {
    if (ids[l] != mask_id || pred[l] == mask_id) continue;
    any_above |= conf[l] >= thr;
    best = std::max(best, conf[l]);
  }
  const float limit = any_above ? thr : best - 1e-5f;
  for (int64_t l = 0; l < L; ++l)
    out[l] = ids[l] == mask_id && pred[l] != mask_id && conf[l] >= limit;
}

}  // namespace

at::Tensor promote(const at::Tensor& ids, const at::Tensor& conf, const at::Tensor& pred,
                   double threshold, int64_t mask_id, bool prefix) {
  checks::check_promote_args(ids, conf, pred, threshold);
  TORCH_CHECK(ids.device().is_cpu(), "promote: the CPU kernel got ", ids.device(), " tensors");
  const auto ids_c = ids.contiguous(), conf_c = conf.contiguous(), pred_c = pred.contiguous();
  const int64_t B = ids.size(0), L = ids.size(1);
  auto out = at::empty({B, L}, ids.options().dtype(at::kBool));
  const int64_t* ids_p = ids_c.const_data_ptr<int64_t>();
  const float* conf_p = conf_c.const_data_ptr<float>();
  const int64_t* pred_p = pred_c.const_data_ptr<int64_t>();
  bool* out_p = out.mutable_data_ptr<bool>();
  const float thr = static_cast<float>(threshold);  // compared in float32, like the reference
  // A row is a few hundred nanoseconds of work: only large batches are worth the threads.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(L, 1));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = b * L;
      if (prefix)
        promote_prefix_row(ids_p + o, conf_p + o, L, thr, mask_id, out_p + o);
      else
        promote_threshold_row(ids_p + o, conf_p + o, pred_p + o, L, thr, mask_id, out_p + o);
    }
  });
  return out;
}

}  // namespace dmax::cpu
