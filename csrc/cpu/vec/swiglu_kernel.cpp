// dmax.swiglu on the CPU, a range of rows at a time (compiled once per CPU capability, see
// swiglu_kernel.h): one pass over each row's gate and up halves, two vectors a step.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>

#include "cpu/vec/load_float.h"
#include "cpu/vec/swiglu.h"
#include "cpu/vec/swiglu_kernel.h"

namespace dmax::cpu::CPU_CAPABILITY {

template <class T>
void swiglu_gate_up_rows(const T* gate_up, int64_t I, T* out, int64_t begin, int64_t end) {
  constexpr int64_t kW = at::vec::Vectorized<float>::size();
  const auto lanes = [&](const T* gate, int64_t j, int64_t n) {
    return swiglu_lanes<T>(load_float(gate + j, n), load_float(gate + I + j, n));
  };
  for (int64_t r = begin; r < end; ++r) {
    const T* gate = gate_up + r * 2 * I;
    T* row = out + r * I;
    int64_t j = 0;
    for (; j + 2 * kW <= I; j += 2 * kW)
      store_rounded_pair(lanes(gate, j, kW), lanes(gate, j + kW, kW), row + j);
    for (; j < I; j += kW) {
      const int64_t n = std::min(kW, I - j);
      store_from_float(lanes(gate, j, n), row + j, n);
    }
  }
}

template void swiglu_gate_up_rows<float>(const float*, int64_t, float*, int64_t, int64_t);
template void swiglu_gate_up_rows<c10::Half>(const c10::Half*, int64_t, c10::Half*, int64_t,
                                             int64_t);
template void swiglu_gate_up_rows<c10::BFloat16>(const c10::BFloat16*, int64_t, c10::BFloat16*,
                                                 int64_t, int64_t);

}  // namespace dmax::cpu::CPU_CAPABILITY
