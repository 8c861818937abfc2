// dmax.logits_stats on the CPU: checks, outputs, and a parallel loop over rows calling the row
// kernel compiled for the best CPU capability (csrc/cpu/vec/logits_stats_kernel.cpp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "common/sampling_checks.h"
#include "cpu/vec/capability.h"
#include "cpu/vec/logits_stats_kernel.h"
#include "ops_cpu.h"

namespace dmax::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logits_stats(
    const at::Tensor& logits, int64_t k, double temperature,
    const std::optional<at::Tensor>& seeds) {
  checks::check_logits_stats_args(logits, k, temperature, seeds);
  const int64_t B = logits.size(0), L = logits.size(1), V = logits.size(2);
  const auto dtype = logits.scalar_type();
  const bool sample = temperature > 0;
  const auto long_opts = logits.options().dtype(at::kLong);
  const auto float_opts = logits.options().dtype(at::kFloat);
  at::Tensor pred = at::empty({B, L}, long_opts);
  at::Tensor conf = at::empty({B, L}, float_opts);
  at::Tensor topk_ids = at::empty({B, L, k}, long_opts);
  at::Tensor topk_probs = at::empty({B, L, k}, float_opts);
  at::Tensor seeds_c = sample ? seeds->contiguous() : at::Tensor();

  LogitsStatsArgs args{};
  args.logits = logits.data_ptr();
  args.dtype = dtype == at::kFloat  ? LogitsDtype::kFloat
               : dtype == at::kHalf ? LogitsDtype::kHalf
                                    : LogitsDtype::kBFloat16;
  args.L = L;
  args.V = V;
  args.k = static_cast<int>(k);
  args.temperature = temperature;
  args.seeds = sample ? seeds_c.data_ptr<int64_t>() : nullptr;
  args.pred = pred.data_ptr<int64_t>();
  args.conf = conf.data_ptr<float>();
  args.topk_ids = topk_ids.data_ptr<int64_t>();
  args.topk_probs = topk_probs.data_ptr<float>();

  static const auto rows_kernel = DMAX_CPU_KERNEL(logits_stats_rows);
  // A row is ~V exps: small V gets several rows per task so tasks stay above ~32k logits.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
  at::parallel_for(0, B * L, grain,
                   [&](int64_t begin, int64_t end) { rows_kernel(args, begin, end); });
  return {pred, conf, topk_ids, topk_probs};
}

}  // namespace dmax::cpu
