// torch.ops.dmax.moe_route on the kernel path (CUDA, or the simt emulation): checks, then
// launch_moe_route (csrc/cuda/moe_route.cu).
#pragma once
#include <tuple>

#include "common/layer_op_checks.h"
#include "cuda/bindings/common.h"
#include "cuda/launchers.h"

namespace dmax::gpu {

inline std::tuple<at::Tensor, at::Tensor> moe_route(const at::Tensor& logits,
                                                    const at::Tensor& expert_bias,
                                                    int64_t n_group, int64_t topk_group,
                                                    int64_t top_k, double scaling) {
  checks::check_moe_route_args(logits, expert_bias, n_group, topk_group, top_k);
  check_kernel_device(logits, "logits");
  DeviceGuard guard(logits);
  const at::Tensor logits_c = logits.contiguous(), bias_c = expert_bias.contiguous();
  const int64_t rows = logits.size(0);
  at::Tensor ids = at::empty({rows, top_k}, logits.options().dtype(at::kLong));
  at::Tensor weights = at::empty({rows, top_k}, logits.options());
#ifdef DMAX_SIMT
  ids.fill_(-1);  // poisoned: an element the emulated kernel forgets to write shows up
  weights.fill_(NAN);
#endif
  launch_moe_route(logits_c.const_data_ptr<float>(), bias_c.const_data_ptr<float>(),
                   ids.mutable_data_ptr<int64_t>(), weights.mutable_data_ptr<float>(), rows,
                   logits.size(1), n_group, topk_group, top_k, static_cast<float>(scaling),
                   current_stream(logits));
  return {ids, weights};
}

}  // namespace dmax::gpu
