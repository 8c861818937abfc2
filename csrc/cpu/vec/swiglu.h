// SwiGLU's lanes rounded as the torch formulation rounds them, for gate and up lanes that are
// values of T already: r(r(g / (1 + exp(-g))) * u), r() rounding to T. torch's CPU silu kernel
// computes x / (1 + exp(-x)) on float32 vectors and rounds to the tensor's dtype, and the product
// of two T tensors is rounded once. Shared by the routed experts (moe_experts_kernel.cpp) and
// dmax.swiglu (swiglu_kernel.cpp). In the capability's namespace, like load_float.h.
#pragma once
#include <ATen/cpu/vec/vec.h>

#include "cpu/vec/load_float.h"

namespace dmax::cpu::CPU_CAPABILITY {

template <class T>
inline at::vec::Vectorized<float> swiglu_lanes(const at::vec::Vectorized<float>& g,
                                               const at::vec::Vectorized<float>& u) {
  const at::vec::Vectorized<float> silu =
      round_to<T>(g / (at::vec::Vectorized<float>(1.f) + g.neg().exp()));
  return round_to<T>(silu * u);
}

}  // namespace dmax::cpu::CPU_CAPABILITY
