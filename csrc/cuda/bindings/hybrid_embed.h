// torch.ops.dmax.hybrid_embed on the kernel path (CUDA, or the simt emulation): checks, then
// launch_hybrid_embed (csrc/cuda/hybrid_embed.cu), writing `embeds` in place.
#pragma once
#include "common/spd_checks.h"
#include "cuda/bindings/common.h"
#include "cuda/launchers.h"

namespace dmax::gpu {

inline void hybrid_embed(const at::Tensor& embeds, const at::Tensor& weight, const at::Tensor& ids,
                         const at::Tensor& active, const at::Tensor& changed,
                         const at::Tensor& topk_ids, const at::Tensor& topk_probs,
                         int64_t mask_id) {
  checks::check_hybrid_embed_args(embeds, weight, ids, active, changed, topk_ids, topk_probs,
                                  mask_id);
  check_kernel_device(embeds, "embeds");
  DeviceGuard guard(embeds);
  const auto ids_c = ids.contiguous(), active_c = active.contiguous();
  const auto changed_c = changed.contiguous(), topk_ids_c = topk_ids.contiguous();
  const auto topk_probs_c = topk_probs.contiguous();
  HybridEmbedArgs args;
  args.embeds = embeds.data_ptr();
  args.dtype = float_type_of(embeds.scalar_type());
  args.embeds_stride_b = embeds.stride(0);
  args.embeds_stride_l = embeds.stride(1);
  args.weight = weight.const_data_ptr();
  args.weight_stride = weight.stride(0);
  args.vocab = weight.size(0);
  args.ids = ids_c.const_data_ptr<int64_t>();
  args.active = active_c.const_data_ptr<bool>();
  args.changed = changed_c.const_data_ptr<bool>();
  args.topk_ids = topk_ids_c.const_data_ptr<int64_t>();
  args.topk_probs = topk_probs_c.const_data_ptr<float>();
  args.batch = embeds.size(0);
  args.length = embeds.size(1);
  args.hidden = embeds.size(2);
  args.k = topk_ids.size(2);
  args.mask_id = mask_id;
  launch_hybrid_embed(args, current_stream(embeds));
}

}  // namespace dmax::gpu
