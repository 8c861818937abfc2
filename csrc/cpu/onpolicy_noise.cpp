// dmax.onpolicy_noise on the CPU: the on-policy rollout's replacement of masked positions
// (SPEC section 4, step 3). Semantics: python/dmax_ext/reference.py (onpolicy_noise_reference).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "common/rng.h"
#include "common/sampling_checks.h"
#include "ops_cpu.h"

namespace dmax::cpu {

at::Tensor onpolicy_noise(const at::Tensor& noisy_ids, const at::Tensor& sample_flags,
                          const at::Tensor& topk_ids, const at::Tensor& topk_probs,
                          double temperature, const std::optional<at::Tensor>& seeds,
                          int64_t mask_id) {
  checks::check_onpolicy_noise_args(noisy_ids, sample_flags, topk_ids, topk_probs, temperature,
                                    seeds);
  const int64_t B = noisy_ids.size(0), L = noisy_ids.size(1), k = topk_ids.size(2);
  const bool sample = temperature > 0 && k > 1;
  const at::Tensor ids_c = noisy_ids.contiguous(), flags_c = sample_flags.contiguous();
  const at::Tensor tids_c = topk_ids.contiguous(), tprobs_c = topk_probs.contiguous();
  const at::Tensor seeds_c = sample ? seeds->contiguous() : at::Tensor();
  at::Tensor out = at::empty({B, L}, noisy_ids.options());

  const int64_t* ids = ids_c.data_ptr<int64_t>();
  const bool* flags = flags_c.data_ptr<bool>();
  const int64_t* tids = tids_c.data_ptr<int64_t>();
  const float* tprobs = tprobs_c.data_ptr<float>();
  const int64_t* seed = sample ? seeds_c.data_ptr<int64_t>() : nullptr;
  int64_t* dst = out.data_ptr<int64_t>();
  const double inv_t = sample ? 1.0 / temperature : 0.0;
  at::parallel_for(0, B * L, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / L;
      if (!flags[b] || ids[r] != mask_id) {
        dst[r] = ids[r];
        continue;
      }
      int i = 0;
      if (sample) {
        const double u = rng_uniform(seed[b], static_cast<uint32_t>(r % L), 0u);
        i = draw_tempered_candidate(tprobs + r * k, static_cast<int>(k), inv_t, u);
      }
      dst[r] = tids[r * k + i];
    }
  });
  return out;
}

}  // namespace dmax::cpu
