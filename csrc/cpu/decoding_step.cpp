// The decoding step as one CPU op, after its forward, in place on the block's state, as the ops
// it is made of run it (decoding/step.py spd_step_composed / threshold_step_composed):
//   dmax.spd_step: SPEC section 3 steps 2-6, logits_stats -> promote -> spd_update ->
//     hybrid_embed;
//   dmax.threshold_step: the hard-threshold baseline, logits_stats -> promote (anywhere) ->
//     commit the promoted ids -> converged when no mask is left;
// both keeping the converged rows as they are, checking the probabilities for NaN, step + 1.
//
// Why one op: in a decode the step runs right after a forward that streamed the model's weights
// through the caches, and its ~8 dispatches from Python each paid the cold interpreter and
// dispatcher paths: 282 us a step of llada2-small in bf16 where the same calls run again take
// 175 us and the kernels ~131 (docs/PERFORMANCE.md, 2026-12-07). CUDA keeps the separate ops: a
// replayed graph dispatches nothing, and the GPU step's trace counts their launches one by one.
#include <ATen/ATen.h>

#include <cmath>

#include "common/spd_checks.h"
#include "ops_cpu.h"

namespace dmax::cpu {
namespace {

// ops.check_softmax_defined's error, from conf in place of a reduction and a host read.
void check_softmax_defined(const at::Tensor& conf) {
  const float* c = conf.const_data_ptr<float>();
  const int64_t L = conf.size(1);
  for (int64_t i = 0; i < conf.numel(); ++i) {
    TORCH_CHECK_VALUE(!std::isnan(c[i]), "logits[", i / L, ", ", i % L,
                      "] has a NaN or +inf logit or only -inf logits: its softmax is undefined");
  }
}

bool any_true(const at::Tensor& flags) {
  const bool* f = flags.const_data_ptr<bool>();
  for (int64_t i = 0; i < flags.numel(); ++i)
    if (f[i]) return true;
  return false;
}

// The row seeds of this step (the block's base + its step index, decoding/step.py) and the
// softmax statistics, checked: what both steps start with.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> checked_stats(
    const at::Tensor& logits, const at::Tensor& step, const std::optional<at::Tensor>& seeds,
    int64_t k, double temperature) {
  const std::optional<at::Tensor> row_seeds =
      temperature > 0 ? std::optional<at::Tensor>(*seeds + step) : std::nullopt;
  auto stats = logits_stats(logits.contiguous(), k, temperature, row_seeds);
  check_softmax_defined(std::get<1>(stats));
  return stats;
}

}  // namespace

void spd_step(const at::Tensor& logits, const at::Tensor& ids, const at::Tensor& embeds,
              const at::Tensor& done, const at::Tensor& step, const at::Tensor& active,
              const at::Tensor& weight, const std::optional<at::Tensor>& seeds, int64_t k,
              double temperature, double threshold, double accept_threshold, int64_t mask_id) {
  checks::check_step_args("spd_step", logits, ids, done, step, active, seeds, temperature);
  checks::check_step_embeds("spd_step", logits, embeds);
  auto [pred, conf, topk_ids, topk_probs] = checked_stats(logits, step, seeds, k, temperature);
  const at::Tensor promoted = promote(ids, conf, pred, threshold, mask_id, /*prefix=*/true);
  auto [new_ids, changed, converged] =
      spd_update(ids, active, promoted, pred, conf, accept_threshold, mask_id);
  if (!any_true(done)) {  // no converged row to keep as it is (the eager steps: they leave)
    // A row that converged at this step may get new embeddings: they are never fed.
    hybrid_embed(embeds, weight, new_ids, active, changed, topk_ids, topk_probs, mask_id);
    ids.copy_(new_ids);
  } else {
    const at::Tensor live = done.logical_not().unsqueeze(1);
    hybrid_embed(embeds, weight, new_ids, active.logical_and(live), changed.logical_and(live),
                 topk_ids, topk_probs, mask_id);
    ids.copy_(at::where(live, new_ids, ids));
  }
  done.logical_or_(converged);
  step.add_(1);
}

void threshold_step(const at::Tensor& logits, const at::Tensor& ids, const at::Tensor& done,
                    const at::Tensor& step, const at::Tensor& active,
                    const std::optional<at::Tensor>& seeds, int64_t k, double temperature,
                    double threshold, int64_t mask_id) {
  checks::check_step_args("threshold_step", logits, ids, done, step, active, seeds, temperature);
  auto [pred, conf, topk_ids, topk_probs] = checked_stats(logits, step, seeds, k, temperature);
  const at::Tensor promoted = promote(ids, conf, pred, threshold, mask_id, /*prefix=*/false);
  const at::Tensor new_ids = at::where(promoted, pred, ids);
  const at::Tensor converged = new_ids.eq(mask_id).logical_and_(active).any(1).logical_not_();
  ids.copy_(any_true(done) ? at::where(done.logical_not().unsqueeze(1), new_ids, ids) : new_ids);
  done.logical_or_(converged);
  step.add_(1);
}

}  // namespace dmax::cpu
