// swiglu: silu(gate) * up over rows [gate | up] (a gated MLP after its gate and up projections
// made as one product): one launch where the torch formulation is two (silu, mul).
// Semantics: dmax_ext.reference.swiglu_reference, rounded as torch rounds it (and as the CPU
// kernel, csrc/cpu/vec/swiglu.h): out = T(T(g / (1 + exp(-g))) * u), float32 math.
// One thread per output element, grid-stride: consecutive threads read consecutive gate and up
// elements (coalesced).
#pragma once
#include <cstdint>

#include "kernels/device.h"
#include "kernels/float_convert.cuh"

namespace dmax::kernels {

constexpr unsigned kSwigluThreads = 256;
constexpr long long kSwigluMaxBlocks = 4096;

// gate_up [rows, 2 * inter] contiguous -> out [rows, inter] contiguous.
template <class T>
__global__ void __launch_bounds__(kSwigluThreads)
swiglu_kernel(const T* __restrict__ gate_up, T* __restrict__ out, int64_t rows, int64_t inter) {
  const int64_t n = rows * inter;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += step) {
    const int64_t r = e / inter, i = e % inter;
    const float g = to_float(gate_up[r * 2 * inter + i]);
    const float u = to_float(gate_up[r * 2 * inter + inter + i]);
    const float silu = round_to<T>(g / (1.f + expf(-g)));
    out[e] = from_float<T>(silu * u);
  }
}

inline LaunchConfig swiglu_launch_config(int64_t rows, int64_t inter) {
  const long long blocks = (rows * inter + kSwigluThreads - 1) / kSwigluThreads;
  return {dim3(static_cast<unsigned>(blocks < kSwigluMaxBlocks ? blocks : kSwigluMaxBlocks)),
          dim3(kSwigluThreads), 0};
}

}  // namespace dmax::kernels
