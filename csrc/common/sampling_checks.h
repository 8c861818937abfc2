// Argument checks of logits_stats and onpolicy_noise, shared by the CPU implementations
// (csrc/cpu/) and the kernel bindings (csrc/cuda/bindings/). They guard what the kernels rely on
// (dtypes, shapes, contiguity, one device, k in 1..8, seeds when sampling); the Python wrappers
// in dmax_ext.ops check the same things first, plus the values (NaN logits, ids).
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "common/spd_checks.h"

namespace dmax::checks {

inline void check_temperature(double temperature, const char* op) {
  TORCH_CHECK(std::isfinite(temperature) && temperature >= 0.0, op,
              ": temperature must be finite and >= 0, got ", temperature);
}

inline void check_seeds(const std::optional<at::Tensor>& seeds, const char* op, int64_t batch,
                        const at::Device& device) {
  TORCH_CHECK(seeds.has_value(), op, ": seeds (int64 [B]) are required when temperature > 0");
  check_arg(*seeds, op, "seeds", at::kLong, {batch}, device);
}

inline void check_logits_stats_args(const at::Tensor& logits, int64_t k, double temperature,
                                    const std::optional<at::Tensor>& seeds) {
  constexpr const char* op = "logits_stats";
  TORCH_CHECK(logits.dim() == 3, op, ": logits must be [B, L, V], got shape ", logits.sizes());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": logits must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(logits.is_contiguous(), op, ": logits must be contiguous");
  const int64_t V = logits.size(2);
  TORCH_CHECK(V < (int64_t{1} << 31), op, ": V must be < 2^31, got ", V);
  TORCH_CHECK(k >= 1 && k <= kMaxTopK, op, ": k must be in 1..", kMaxTopK, ", got ", k);
  TORCH_CHECK(k <= V, op, ": k must be <= V = ", V, ", got ", k);
  check_temperature(temperature, op);
  if (temperature > 0.0) check_seeds(seeds, op, logits.size(0), logits.device());
}

inline void check_onpolicy_noise_args(const at::Tensor& noisy_ids, const at::Tensor& sample_flags,
                                      const at::Tensor& topk_ids, const at::Tensor& topk_probs,
                                      double temperature, const std::optional<at::Tensor>& seeds) {
  constexpr const char* op = "onpolicy_noise";
  TORCH_CHECK(noisy_ids.dim() == 2, op, ": noisy_ids must be [B, L], got ", noisy_ids.sizes());
  const int64_t B = noisy_ids.size(0), L = noisy_ids.size(1);
  const auto device = noisy_ids.device();
  check_arg(noisy_ids, op, "noisy_ids", at::kLong, {B, L}, device);
  check_arg(sample_flags, op, "sample_flags", at::kBool, {B}, device);
  const int64_t k = check_topk_args(topk_ids, topk_probs, op, B, L, device);
  check_temperature(temperature, op);
  if (temperature > 0.0 && k > 1) check_seeds(seeds, op, B, device);
}

}  // namespace dmax::checks
