// dmax.swiglu on the CPU: silu(gate) * up over rows [gate | up] (a gated MLP's gate and up
// projections made as one product), as one op where the torch formulation is silu, mul and
// their two outputs; rows in parallel, each running csrc/cpu/vec/swiglu_kernel.cpp.
// Semantics: dmax_ext.reference.swiglu_reference; the CUDA kernel: csrc/kernels/swiglu.cuh.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/layer_op_checks.h"
#include "cpu/dispatch_float.h"
#include "cpu/vec/capability.h"
#include "cpu/vec/swiglu_kernel.h"
#include "ops_cpu.h"

namespace dmax::cpu {

at::Tensor swiglu(const at::Tensor& gate_up) {
  checks::check_swiglu_args(gate_up);
  const auto dtype = gate_up.scalar_type();
  const at::Tensor x = gate_up.contiguous();
  const int64_t I = x.size(-1) / 2;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = I;
  at::Tensor out = at::empty(shape, x.options());
  if (out.numel() == 0) return out;
  const int64_t rows = out.numel() / I;
  return dispatch_float(dtype, [&](auto t) {
    using T = decltype(t);
    static const auto rows_kernel = DMAX_CPU_KERNEL(swiglu_gate_up_rows<T>);
    const T* in_p = x.const_data_ptr<T>();
    T* out_p = out.mutable_data_ptr<T>();
    // ~2 ns an output (an exp and a division): chunks of >= ~16K outputs, ~30 us.
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / I);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      rows_kernel(in_p, I, out_p, begin, end);
    });
    return out;
  });
}

}  // namespace dmax::cpu
