// CPU spd_update: SPEC steps 4-5 (update the ids, detect convergence), one sequence at a time,
// parallel over the batch.
#include <ATen/Parallel.h>

#include <algorithm>

#include "common/spd_checks.h"
#include "ops_cpu.h"

namespace dmax::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> spd_update(
    const at::Tensor& ids, const at::Tensor& active, const at::Tensor& promoted,
    const at::Tensor& pred, const at::Tensor& conf, double accept_threshold, int64_t mask_id) {
  checks::check_spd_update_args(ids, active, promoted, pred, conf, accept_threshold);
  TORCH_CHECK(ids.device().is_cpu(), "spd_update: the CPU kernel got ", ids.device(), " tensors");
  const auto ids_c = ids.contiguous(), active_c = active.contiguous();
  const auto promoted_c = promoted.contiguous(), pred_c = pred.contiguous();
  const auto conf_c = conf.contiguous();
  const int64_t B = ids.size(0), L = ids.size(1);
  auto new_ids = at::empty({B, L}, ids.options());
  auto changed = at::empty({B, L}, ids.options().dtype(at::kBool));
  auto converged = at::empty({B}, ids.options().dtype(at::kBool));
  const int64_t* ids_p = ids_c.const_data_ptr<int64_t>();
  const bool* active_p = active_c.const_data_ptr<bool>();
  const bool* promoted_p = promoted_c.const_data_ptr<bool>();
  const int64_t* pred_p = pred_c.const_data_ptr<int64_t>();
  const float* conf_p = conf_c.const_data_ptr<float>();
  int64_t* new_p = new_ids.mutable_data_ptr<int64_t>();
  bool* changed_p = changed.mutable_data_ptr<bool>();
  bool* converged_p = converged.mutable_data_ptr<bool>();
  const float acc = static_cast<float>(accept_threshold);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(L, 1));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = b * L;
      bool any_masked = false;
      for (int64_t l = 0; l < L; ++l) any_masked |= ids_p[o + l] == mask_id;
      bool all_confident = true, any_changed = false;
      for (int64_t l = o; l < o + L; ++l) {
        const bool act = active_p[l];
        // With nothing masked, every active position is revised (the release's rule).
        const bool update = any_masked ? promoted_p[l] || (act && ids_p[l] != mask_id) : act;
        const bool ch = update && pred_p[l] != ids_p[l];
        new_p[l] = update ? pred_p[l] : ids_p[l];
        changed_p[l] = ch;
        any_changed |= ch;
        all_confident &= !act || conf_p[l] >= acc;
      }
      converged_p[b] = all_confident || !any_changed;
    }
  });
  return {new_ids, changed, converged};
}

}  // namespace dmax::cpu
