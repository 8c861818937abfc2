// torch.ops.dmax.onpolicy_noise on the kernel path (CUDA, or the simt emulation): checks, output,
// then launch_onpolicy_noise (csrc/cuda/onpolicy_noise.cu).
#pragma once
#include <optional>

#include "common/sampling_checks.h"
#include "cuda/bindings/common.h"
#include "cuda/launchers.h"

namespace dmax::gpu {

inline at::Tensor onpolicy_noise(const at::Tensor& noisy_ids, const at::Tensor& sample_flags,
                                 const at::Tensor& topk_ids, const at::Tensor& topk_probs,
                                 double temperature, const std::optional<at::Tensor>& seeds,
                                 int64_t mask_id) {
  checks::check_onpolicy_noise_args(noisy_ids, sample_flags, topk_ids, topk_probs, temperature,
                                    seeds);
  check_kernel_device(noisy_ids, "noisy_ids");
  DeviceGuard guard(noisy_ids);
  const int64_t B = noisy_ids.size(0), L = noisy_ids.size(1), k = topk_ids.size(2);
  const bool sample = temperature > 0.0 && k > 1;
  const auto ids_c = noisy_ids.contiguous(), flags_c = sample_flags.contiguous();
  const auto tids_c = topk_ids.contiguous(), tprobs_c = topk_probs.contiguous();
  const at::Tensor seeds_c = sample ? seeds->contiguous() : at::Tensor();
  auto new_ids = at::empty({B, L}, noisy_ids.options());
#ifdef DMAX_SIMT
  new_ids.fill_(-1);  // poisoned: an unwritten position fails the comparison
#endif
  launch_onpolicy_noise(ids_c.const_data_ptr<int64_t>(), flags_c.const_data_ptr<bool>(),
                        tids_c.const_data_ptr<int64_t>(), tprobs_c.const_data_ptr<float>(), B, L,
                        static_cast<int>(k), temperature,
                        sample ? seeds_c.const_data_ptr<int64_t>() : nullptr, mask_id,
                        new_ids.mutable_data_ptr<int64_t>(), current_stream(noisy_ids));
  return new_ids;
}

}  // namespace dmax::gpu
