// torch.ops.dmax.swiglu on the kernel path (CUDA, or the simt emulation): checks, then
// launch_swiglu (csrc/cuda/swiglu.cu).
#pragma once
#include <vector>

#include "common/layer_op_checks.h"
#include "cuda/bindings/common.h"
#include "cuda/launchers.h"

namespace dmax::gpu {

inline at::Tensor swiglu(const at::Tensor& gate_up) {
  checks::check_swiglu_args(gate_up);
  check_kernel_device(gate_up, "gate_up");
  DeviceGuard guard(gate_up);
  const at::Tensor x = gate_up.contiguous();
  const int64_t inter = x.size(-1) / 2;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = inter;
  at::Tensor out = at::empty(shape, x.options());
#ifdef DMAX_SIMT
  out.fill_(NAN);
#endif
  if (out.numel() == 0) return out;
  launch_swiglu(x.const_data_ptr(), out.mutable_data_ptr(), float_type_of(x.scalar_type()),
                out.numel() / inter, inter, current_stream(x));
  return out;
}

}  // namespace dmax::gpu
