// moe_dispatch and moe_combine: the permutation around a MoE layer's grouped GEMMs, as two
// launches where the torch formulation (model/moe.py StackedExperts, "grouped") is ~16: a stable
// argsort of the routed expert ids, rows per expert, offsets, the rows' token ids, then the
// inverse permutation, the gather back, the weighted sum in float32 and the cast.
// Semantics: dmax_ext.reference.moe_dispatch_reference / moe_combine_reference.
//
// moe_dispatch: one block for all N * k routed entries (a decoding step's 32 tokens per sequence
// make a few hundred to a few thousand; the model takes the torch path past
// kMaxDispatchEntries). The entries' experts go to shared memory; rows per expert by shared
// atomics (a count: the same for any order); their running sums by thread 0; then each entry's
// place, its expert's start plus the number of earlier entries of that expert (a stable order:
// entry order within an expert, as argsort(stable=True)).
// moe_combine: one block per token, the threads over H: out[n] = T(sum_j w[n, j] x[inverse[n k +
// j]]) in float32, j in order, each product rounded before its add (no fused multiply-add), as
// torch computes the float32 product tensor and then sums it.
#pragma once
#include <cstdint>

#include "kernels/block_reduce.cuh"
#include "kernels/device.h"
#include "kernels/float_convert.cuh"

namespace dmax::kernels {

constexpr int kMaxDispatchEntries = 4096;  // N * k; shared memory: 4 B an entry
constexpr int kMaxDispatchExperts = 2048;  // shared memory: 8 B an expert
constexpr unsigned kDispatchMaxThreads = 1024;
constexpr unsigned kCombineMaxThreads = 256;

// ids [entries] (entry i = token i / k, slot i % k) -> rows [entries] (the token of each entry
// in expert order), inverse [entries] (each entry's place in that order), offsets [experts] int32
// (the end of each expert's rows: torch._grouped_mm's offs). Ids outside [0, experts) (the
// wrappers and the CPU op reject them) are clamped, so memory stays safe.
// Dynamic shared memory: (entries + 2 experts) ints.
__global__ void __launch_bounds__(kDispatchMaxThreads)
moe_dispatch_kernel(const int64_t* __restrict__ ids, int entries, int k, int experts,
                    int64_t* __restrict__ rows, int64_t* __restrict__ inverse,
                    int32_t* __restrict__ offsets) {
  DMAX_DYNAMIC_SMEM(int, dispatch_smem);
  int* expert_of = dispatch_smem;          // [entries]
  int* counts = expert_of + entries;       // [experts]
  int* starts = counts + experts;          // [experts]
  for (int i = threadIdx.x; i < entries; i += blockDim.x) {
    const int64_t e = ids[i];
    expert_of[i] = static_cast<int>(e < 0 ? 0 : (e >= experts ? experts - 1 : e));
  }
  for (int e = threadIdx.x; e < experts; e += blockDim.x) counts[e] = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < entries; i += blockDim.x) atomicAdd(&counts[expert_of[i]], 1);
  __syncthreads();
  if (threadIdx.x == 0) {
    int sum = 0;
    for (int e = 0; e < experts; ++e) {
      starts[e] = sum;
      sum += counts[e];
      offsets[e] = sum;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < entries; i += blockDim.x) {
    const int e = expert_of[i];
    int place = starts[e];
    for (int j = 0; j < i; ++j) place += expert_of[j] == e;
    rows[place] = i / k;
    inverse[i] = place;
  }
}

// sorted_out [entries, hidden] (rows in expert order), inverse [tokens * k], weights [tokens, k]
// float32 -> out [tokens, hidden], all contiguous.
// addend [tokens, hidden] or nullptr (the shared expert's output): out = T(T(sum) + addend), as
// the torch formulation adds the two rounded tensors.
template <class T>
__global__ void __launch_bounds__(kCombineMaxThreads)
moe_combine_kernel(const T* __restrict__ sorted_out, const int64_t* __restrict__ inverse,
                   const float* __restrict__ weights, const T* __restrict__ addend,
                   T* __restrict__ out, int k, int hidden) {
  const int64_t n = blockIdx.x;
  const int64_t* places = inverse + n * k;
  const float* w = weights + n * k;
  for (int h = threadIdx.x; h < hidden; h += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < k; ++j)
      acc = __fadd_rn(acc, __fmul_rn(w[j], to_float(sorted_out[places[j] * hidden + h])));
    T value = from_float<T>(acc);
    if (addend != nullptr)
      value = from_float<T>(to_float(value) + to_float(addend[n * hidden + h]));
    out[n * hidden + h] = value;
  }
}

inline LaunchConfig moe_dispatch_launch_config(int64_t entries, int64_t experts) {
  return {dim3(1), dim3(block_threads_for(entries, kDispatchMaxThreads)),
          static_cast<size_t>(entries + 2 * experts) * sizeof(int)};
}

inline LaunchConfig moe_combine_launch_config(int64_t tokens, int64_t hidden) {
  return {dim3(static_cast<unsigned>(tokens)), dim3(block_threads_for(hidden, kCombineMaxThreads)),
          0};
}

}  // namespace dmax::kernels
