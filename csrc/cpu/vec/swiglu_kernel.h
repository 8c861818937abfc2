// The row kernel of dmax.swiglu on the CPU. swiglu_kernel.cpp is compiled once per CPU capability
// (cmake/cpu_capability.cmake); csrc/cpu/swiglu.cpp picks one at run time (capability.h).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace dmax::cpu {

// Rows [begin, end) of out [rows, I] = silu(gate) * up for gate_up [rows, 2I] = [gate | up],
// both contiguous, rounded as swiglu.h says.
#define DMAX_DECLARE_SWIGLU_GATE_UP_ROWS(cap)                                                  \
  namespace cap {                                                                             \
  template <class T>                                                                          \
  void swiglu_gate_up_rows(const T* gate_up, int64_t I, T* out, int64_t begin, int64_t end);  \
  extern template void swiglu_gate_up_rows<float>(const float*, int64_t, float*, int64_t,     \
                                                  int64_t);                                   \
  extern template void swiglu_gate_up_rows<c10::Half>(const c10::Half*, int64_t, c10::Half*, \
                                                      int64_t, int64_t);                      \
  extern template void swiglu_gate_up_rows<c10::BFloat16>(const c10::BFloat16*, int64_t,      \
                                                          c10::BFloat16*, int64_t, int64_t);  \
  }
DMAX_DECLARE_SWIGLU_GATE_UP_ROWS(DEFAULT)
DMAX_DECLARE_SWIGLU_GATE_UP_ROWS(AVX2)
DMAX_DECLARE_SWIGLU_GATE_UP_ROWS(AVX512)
#undef DMAX_DECLARE_SWIGLU_GATE_UP_ROWS

}  // namespace dmax::cpu
