// torch.ops.dmax.block_attention on the kernel path (CUDA, or the simt emulation): checks, the
// float32 workspace of the key splits, then launch_block_attention
// (csrc/cuda/block_attention.cu).
#pragma once
#include "common/layer_op_checks.h"
#include "cuda/bindings/common.h"
#include "cuda/launchers.h"

namespace dmax::gpu {

inline at::Tensor block_attention(const at::Tensor& q, const at::Tensor& keys,
                                  const at::Tensor& values, const at::Tensor& mask,
                                  double scale) {
  checks::check_block_attention_args(q, keys, values, mask);
  check_kernel_device(q, "q");
  DeviceGuard guard(q);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  at::Tensor out = at::empty({B, T, H * D}, q.options());
#ifdef DMAX_SIMT
  out.fill_(NAN);
#endif
  BlockAttentionArgs args{q.const_data_ptr(), keys.const_data_ptr(), values.const_data_ptr(),
                          mask.const_data_ptr<bool>(), out.mutable_data_ptr(),
                          B, H, keys.size(1), T, keys.size(2), D,
                          {q.stride(0), q.stride(1), q.stride(2)},
                          {keys.stride(0), keys.stride(1), keys.stride(2)},
                          {values.stride(0), values.stride(1), values.stride(2)},
                          {mask.size(0) == 1 ? 0 : mask.stride(0), mask.stride(2), mask.stride(3)},
                          static_cast<float>(scale)};
  const int multiprocessors = multiprocessor_count(q);
  const FloatType dtype = float_type_of(q.scalar_type());
  const int64_t workspace_floats = block_attention_workspace_floats(args, dtype, multiprocessors);
  at::Tensor workspace = at::empty({workspace_floats}, q.options().dtype(at::kFloat));
#ifdef DMAX_SIMT
  workspace.fill_(NAN);  // poisoned: a split the merge reads but nobody wrote shows up
#endif
  launch_block_attention(args, dtype, multiprocessors,
                         workspace_floats ? workspace.mutable_data_ptr<float>() : nullptr,
                         current_stream(q));
  return out;
}

}  // namespace dmax::gpu
