// dmax.hybrid_embed on the CPU (SPEC section 3 step 6), in place: checks, then a parallel loop
// over the B * L positions. A hard position copies its embedding row; a soft one runs the kernel
// compiled for the best CPU capability (csrc/cpu/vec/hybrid_embed_kernel.cpp) on its k top-k rows
// and the mask row, which is converted to float32 (and its norm taken) once per call.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "common/spd_checks.h"
#include "cpu/vec/capability.h"
#include "cpu/vec/hybrid_embed_kernel.h"
#include "ops_cpu.h"

namespace dmax::cpu {
namespace {

template <class T>
void hybrid_embed_typed(const at::Tensor& embeds, const at::Tensor& weight, const at::Tensor& ids,
                        const at::Tensor& active, const at::Tensor& changed,
                        const at::Tensor& topk_ids, const at::Tensor& topk_probs,
                        int64_t mask_id) {
  static const auto soft_row = DMAX_CPU_KERNEL(hybrid_embed_soft_row<T>);
  const int64_t B = embeds.size(0), L = embeds.size(1), H = embeds.size(2);
  const int64_t V = weight.size(0), k = topk_ids.size(2);
  const int64_t e_sb = embeds.stride(0), e_sl = embeds.stride(1), w_s = weight.stride(0);
  T* emb = embeds.mutable_data_ptr<T>();
  const T* w = weight.const_data_ptr<T>();
  const int64_t* ids_p = ids.const_data_ptr<int64_t>();
  const bool* active_p = active.const_data_ptr<bool>();
  const bool* changed_p = changed.const_data_ptr<bool>();
  const int64_t* tk_ids = topk_ids.const_data_ptr<int64_t>();
  const float* tk_probs = topk_probs.const_data_ptr<float>();

  std::vector<float> mask_row(H);
  at::vec::convert(w + mask_id * w_s, mask_row.data(), H);
  const float mask_norm = std::sqrt(at::vec::map_reduce_all<float>(
      [](auto x) { return x * x; }, [](auto a, auto b) { return a + b; }, mask_row.data(), H));

  // A soft position is ~(k + 2) * H multiply-adds: chunks of ~256K keep the threads' start-up
  // (tens of microseconds, far more on a busy machine) small against the work.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>((k + 2) * H, 1));
  at::parallel_for(0, B * L, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(H);
    for (int64_t pos = begin; pos < end; ++pos) {
      const int64_t id = ids_p[pos];
      const bool soft = active_p[pos] && id != mask_id;
      if (!soft && !changed_p[pos]) continue;
      const int64_t b = pos / L, l = pos % L;
      T* out = emb + b * e_sb + l * e_sl;
      if (!soft) {
        TORCH_CHECK(id >= 0 && id < V, "hybrid_embed: ids[", b, ", ", l, "] = ", id,
                    " is outside the vocabulary [0, ", V, ")");
        std::memcpy(out, w + id * w_s, H * sizeof(T));
        continue;
      }
      for (int64_t i = 0; i < k; ++i) {
        const int64_t t = tk_ids[pos * k + i];
        TORCH_CHECK(t >= 0 && t < V, "hybrid_embed: topk_ids[", b, ", ", l, ", ", i, "] = ", t,
                    " is outside the vocabulary [0, ", V, ")");
      }
      soft_row(SoftRow<T>{w, w_s, tk_ids + pos * k, tk_probs + pos * k, k, H, mask_row.data(),
                          mask_norm, scratch.data(), out});
    }
  });
}

}  // namespace

void hybrid_embed(const at::Tensor& embeds, const at::Tensor& weight, const at::Tensor& ids,
                  const at::Tensor& active, const at::Tensor& changed, const at::Tensor& topk_ids,
                  const at::Tensor& topk_probs, int64_t mask_id) {
  checks::check_hybrid_embed_args(embeds, weight, ids, active, changed, topk_ids, topk_probs,
                                  mask_id);
  TORCH_CHECK(embeds.device().is_cpu(), "hybrid_embed: the CPU kernel got ", embeds.device(),
              " tensors");
  if (embeds.numel() == 0) return;
  const auto ids_c = ids.contiguous(), active_c = active.contiguous();
  const auto changed_c = changed.contiguous(), tk_ids_c = topk_ids.contiguous();
  const auto tk_probs_c = topk_probs.contiguous();
  switch (embeds.scalar_type()) {
    case at::kFloat:
      return hybrid_embed_typed<float>(embeds, weight, ids_c, active_c, changed_c, tk_ids_c,
                                       tk_probs_c, mask_id);
    case at::kHalf:
      return hybrid_embed_typed<at::Half>(embeds, weight, ids_c, active_c, changed_c, tk_ids_c,
                                          tk_probs_c, mask_id);
    default:  // kBFloat16 (checked above)
      return hybrid_embed_typed<at::BFloat16>(embeds, weight, ids_c, active_c, changed_c,
                                              tk_ids_c, tk_probs_c, mask_id);
  }
}

}  // namespace dmax::cpu
