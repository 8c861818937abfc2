// torch.ops.dmax.moe_dispatch / moe_combine on the kernel path (CUDA, or the simt emulation):
// checks, then launch_moe_dispatch / launch_moe_combine (csrc/cuda/moe_dispatch.cu).
#pragma once
#include <optional>
#include <tuple>

#include "common/layer_op_checks.h"
#include "cuda/bindings/common.h"
#include "cuda/launchers.h"

namespace dmax::gpu {

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_dispatch(const at::Tensor& ids,
                                                                   int64_t n_experts) {
  checks::check_moe_dispatch_args(ids, n_experts);
  check_kernel_device(ids, "ids");
  DeviceGuard guard(ids);
  const at::Tensor ids_c = ids.contiguous();
  const auto long_opts = ids.options();
  at::Tensor rows = at::empty({ids.numel()}, long_opts);
  at::Tensor inverse = at::empty({ids.numel()}, long_opts);
  at::Tensor offsets = at::empty({n_experts}, long_opts.dtype(at::kInt));
#ifdef DMAX_SIMT
  rows.fill_(-1);  // poisoned: an element the emulated kernel forgets to write shows up
  inverse.fill_(-1);
  offsets.fill_(-1);
#endif
  launch_moe_dispatch(ids_c.const_data_ptr<int64_t>(), ids.numel(), ids.size(1), n_experts,
                      rows.mutable_data_ptr<int64_t>(), inverse.mutable_data_ptr<int64_t>(),
                      offsets.mutable_data_ptr<int32_t>(), current_stream(ids));
  return {rows, inverse, offsets};
}

inline at::Tensor moe_combine(const at::Tensor& sorted_out, const at::Tensor& inverse,
                              const at::Tensor& weights, const std::optional<at::Tensor>& addend,
                              const std::optional<at::Tensor>& residual) {
  checks::check_moe_combine_args(sorted_out, inverse, weights, addend, residual);
  check_kernel_device(sorted_out, "sorted_out");
  DeviceGuard guard(sorted_out);
  const at::Tensor x = sorted_out.contiguous(), inverse_c = inverse.contiguous();
  const at::Tensor weights_c = weights.contiguous();
  const at::Tensor addend_c = addend.has_value() ? addend->contiguous() : at::Tensor();
  const at::Tensor residual_c = residual.has_value() ? residual->contiguous() : at::Tensor();
  const int64_t tokens = weights.size(0), hidden = sorted_out.size(1);
  at::Tensor out = at::empty({tokens, hidden}, sorted_out.options());
#ifdef DMAX_SIMT
  out.fill_(NAN);
#endif
  launch_moe_combine(x.const_data_ptr(), float_type_of(x.scalar_type()),
                     inverse_c.const_data_ptr<int64_t>(), weights_c.const_data_ptr<float>(),
                     addend.has_value() ? addend_c.const_data_ptr() : nullptr,
                     residual.has_value() ? residual_c.const_data_ptr() : nullptr,
                     out.mutable_data_ptr(), tokens, weights.size(1), hidden,
                     current_stream(sorted_out));
  return out;
}

}  // namespace dmax::gpu
