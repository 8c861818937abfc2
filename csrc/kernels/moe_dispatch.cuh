// moe_dispatch and moe_combine: the permutation around a MoE layer's grouped GEMMs, as two
// launches where the torch formulation (model/moe.py StackedExperts, "grouped") is ~16: a stable
// argsort of the routed expert ids, rows per expert, offsets, the rows' token ids, then the
// inverse permutation, the gather back, the weighted sum in float32 and the cast.
// Semantics: dmax_ext.reference.moe_dispatch_reference / moe_combine_reference.
//
// moe_dispatch: one block for all N * k routed entries (a decoding step's 32 tokens per sequence
// make a few hundred to a few thousand; the model takes the torch path past
// kMaxDispatchEntries). A stable counting sort in shared memory, no step serial in the entries
// or the experts:
//   1. each entry takes a slot in its expert's bucket by a shared atomic (an order that varies
//      between runs) and keeps it in a register;
//   2. the buckets' starts are a block-wide scan of their sizes (the int32 offsets are its
//      inclusive form);
//   3. each entry writes its index at its bucket start + slot;
//   4. each entry's place is its bucket start plus the number of entries of its bucket with a
//      lower index: entry order within an expert, as argsort(stable=True), whatever order the
//      atomics took.
// Step 4 reads one bucket per entry: k/E of the entries on average, at most the N tokens (an
// expert takes a token once), where ranking against every earlier entry read up to all N k.
// moe_combine: one block per token, the threads over H: out[n] = T(sum_j w[n, j] x[inverse[n k +
// j]]) in float32, j in order, each product rounded before its add (no fused multiply-add), as
// torch computes the float32 product tensor and then sums it.
#pragma once
#include <cstdint>

#include "kernels/block_reduce.cuh"
#include "kernels/device.h"
#include "kernels/float_convert.cuh"

namespace dmax::kernels {

constexpr int kMaxDispatchEntries = 4096;  // N * k; shared memory: 6 B an entry
constexpr int kMaxDispatchExperts = 2048;  // shared memory: 8 B an expert; ids fit 16 bits
constexpr unsigned kDispatchMaxThreads = 1024;
constexpr unsigned kCombineMaxThreads = 256;
// Entries a thread handles (their bucket slots live in registers): the launch gives
// ceil(entries / 32) warps up to kDispatchMaxThreads, so at most this many each.
constexpr int kDispatchEntriesPerThread = kMaxDispatchEntries / kDispatchMaxThreads;
static_assert(kDispatchEntriesPerThread * kDispatchMaxThreads == kMaxDispatchEntries,
              "every entry needs a register slot");
static_assert(kMaxDispatchExperts <= 65536, "expert ids are kept as 16 bits in shared memory");

// ids [entries] (entry i = token i / k, slot i % k) -> rows [entries] (the token of each entry
// in expert order), inverse [entries] (each entry's place in that order), offsets [experts] int32
// (the end of each expert's rows: torch._grouped_mm's offs). Ids outside [0, experts) (the
// wrappers and the CPU op reject them) are clamped, so memory stays safe.
// Dynamic shared memory: moe_dispatch_smem_bytes.
__global__ void __launch_bounds__(kDispatchMaxThreads)
moe_dispatch_kernel(const int64_t* __restrict__ ids, int entries, int k, int experts,
                    int64_t* __restrict__ rows, int64_t* __restrict__ inverse,
                    int32_t* __restrict__ offsets) {
  __shared__ int scan_scratch[kMaxWarps];
  DMAX_DYNAMIC_SMEM(int, dispatch_smem);
  int* bucketed = dispatch_smem;      // [entries]: entry indices, grouped by expert
  int* sizes = bucketed + entries;    // [experts]: entries per expert
  int* starts = sizes + experts;      // [experts]: where each expert's bucket begins
  auto* expert_of = reinterpret_cast<uint16_t*>(starts + experts);  // [entries]
  const int threads = static_cast<int>(blockDim.x);
  for (int i = threadIdx.x; i < entries; i += threads) {
    const int64_t e = ids[i];
    expert_of[i] = static_cast<uint16_t>(e < 0 ? 0 : (e >= experts ? experts - 1 : e));
  }
  for (int e = threadIdx.x; e < experts; e += threads) sizes[e] = 0;
  __syncthreads();
  int slot[kDispatchEntriesPerThread];
#pragma unroll
  for (int r = 0; r < kDispatchEntriesPerThread; ++r) {
    const int i = static_cast<int>(threadIdx.x) + r * threads;
    if (i < entries) slot[r] = atomicAdd(&sizes[expert_of[i]], 1);
  }
  __syncthreads();
  // Each thread scans a run of consecutive experts; the runs' totals are scanned over the block.
  const int per_thread = (experts + threads - 1) / threads;
  const int first = static_cast<int>(threadIdx.x) * per_thread;
  const int last = min(first + per_thread, experts);
  int run_total = 0;
  for (int e = first; e < last; ++e) run_total += sizes[e];
  int start = block_exclusive_scan(run_total, scan_scratch);
  for (int e = first; e < last; ++e) {
    starts[e] = start;
    start += sizes[e];
    offsets[e] = start;
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < kDispatchEntriesPerThread; ++r) {
    const int i = static_cast<int>(threadIdx.x) + r * threads;
    if (i < entries) bucketed[starts[expert_of[i]] + slot[r]] = i;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < entries; i += threads) {
    const int e = expert_of[i];
    const int begin = starts[e], end = begin + sizes[e];
    int place = begin;
    for (int j = begin; j < end; ++j) place += bucketed[j] < i;
    rows[place] = i / k;
    inverse[i] = place;
  }
}

inline size_t moe_dispatch_smem_bytes(int64_t entries, int64_t experts) {
  return static_cast<size_t>(entries + 2 * experts) * sizeof(int) +
         static_cast<size_t>(entries) * sizeof(uint16_t);
}

// sorted_out [entries, hidden] (rows in expert order), inverse [tokens * k], weights [tokens, k]
// float32 -> out [tokens, hidden], all contiguous.
// addend [tokens, hidden] or nullptr (the shared expert's output): T(T(sum) + addend); residual
// [tokens, hidden] or nullptr (the decoder layer's): that + residual, rounded again. Each as the
// torch formulation adds two rounded tensors; the residual here saves the layer a launch.
template <class T>
__global__ void __launch_bounds__(kCombineMaxThreads)
moe_combine_kernel(const T* __restrict__ sorted_out, const int64_t* __restrict__ inverse,
                   const float* __restrict__ weights, const T* __restrict__ addend,
                   const T* __restrict__ residual, T* __restrict__ out, int k, int hidden) {
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
    if (residual != nullptr)
      value = from_float<T>(to_float(value) + to_float(residual[n * hidden + h]));
    out[n * hidden + h] = value;
  }
}

inline LaunchConfig moe_dispatch_launch_config(int64_t entries, int64_t experts) {
  return {dim3(1), dim3(block_threads_for(entries, kDispatchMaxThreads)),
          moe_dispatch_smem_bytes(entries, experts)};
}

inline LaunchConfig moe_combine_launch_config(int64_t tokens, int64_t hidden) {
  return {dim3(static_cast<unsigned>(tokens)), dim3(block_threads_for(hidden, kCombineMaxThreads)),
          0};
}

}  // namespace dmax::kernels
