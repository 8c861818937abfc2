// torch.ops.dmax.logits_stats on the kernel path (CUDA, or the simt emulation): checks, outputs,
// then launch_logits_stats (csrc/cuda/logits_stats.cu).
#pragma once
#include <optional>
#include <tuple>

#include "common/sampling_checks.h"
#include "cuda/bindings/common.h"
#include "cuda/launchers.h"

namespace dmax::gpu {

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logits_stats(
    const at::Tensor& logits, int64_t k, double temperature,
    const std::optional<at::Tensor>& seeds) {
  checks::check_logits_stats_args(logits, k, temperature, seeds);
  check_kernel_device(logits, "logits");
  DeviceGuard guard(logits);
  const int64_t B = logits.size(0), L = logits.size(1), V = logits.size(2);
  const bool sample = temperature > 0.0;
  const auto long_opts = logits.options().dtype(at::kLong);
  const auto float_opts = logits.options().dtype(at::kFloat);
  auto pred = at::empty({B, L}, long_opts);
  auto conf = at::empty({B, L}, float_opts);
  auto topk_ids = at::empty({B, L, k}, long_opts);
  auto topk_probs = at::empty({B, L, k}, float_opts);
#ifdef DMAX_SIMT
  // Poisoned outputs: an element the emulated kernel forgets to write fails the comparison.
  pred.fill_(-1);
  conf.fill_(-1.0);
  topk_ids.fill_(-1);
  topk_probs.fill_(-1.0);
#endif
  const at::Tensor seeds_c = sample ? seeds->contiguous() : at::Tensor();
  launch_logits_stats(logits.const_data_ptr(), float_type_of(logits.scalar_type()), B, L, V,
                      static_cast<int>(k), temperature,
                      sample ? seeds_c.const_data_ptr<int64_t>() : nullptr,
                      pred.mutable_data_ptr<int64_t>(), conf.mutable_data_ptr<float>(),
                      topk_ids.mutable_data_ptr<int64_t>(), topk_probs.mutable_data_ptr<float>(),
                      current_stream(logits));
  return {pred, conf, topk_ids, topk_probs};
}

}  // namespace dmax::gpu
