// Block-wide votes, reductions and scans for the kernels that give one block to one sequence or
// one position (promote, spd_update, hybrid_embed) or to a whole step (moe_dispatch).
// Preconditions of every helper: blockDim.x is a multiple of 32 (whole warps, so full-mask warp
// collectives are valid), every thread of the block calls it (it contains __syncthreads), and
// `scratch` is __shared__ storage of the stated size that nobody else uses meanwhile.
#pragma once
#include "kernels/device.h"

namespace dmax::kernels {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxWarps = 32;  // 1024 threads

// Threads for a block that walks `n` items (L positions, or H vectors / items_per_thread): whole
// warps, at least one, at most max_threads; larger n is covered by a loop.
__host__ __device__ inline unsigned block_threads_for(long long n, unsigned max_threads) {
  const long long warps = (n + 31) / 32;
  const long long threads = (warps < 1 ? 1 : warps) * 32;
  return threads < max_threads ? static_cast<unsigned>(threads) : max_threads;
}

// Lowest l in [0, n) with flag(l) true, n when there is none. Positions are taken in chunks of
// blockDim.x; in each chunk every warp ballots its 32 positions and __ffs finds its first (a warp
// stops at its first hit: later chunks only hold higher positions). scratch: int[32].
template <class Flag>
__device__ __forceinline__ int block_first_true(int n, Flag flag, int* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int first = n;  // the same in every lane of the warp
  for (int base = 0; base < n && first == n; base += blockDim.x) {
    const int l = base + static_cast<int>(threadIdx.x);
    const unsigned votes = __ballot_sync(kFullMask, l < n && flag(l));
    if (votes != 0u) first = base + warp * 32 + __ffs(static_cast<int>(votes)) - 1;
  }
  if (lane == 0) scratch[warp] = first;
  __syncthreads();
  int result = n;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) result = min(result, scratch[w]);
  __syncthreads();  // scratch is free again when this returns
  return result;
}

// Whether `value` is true in any thread of the block. scratch: int[32].
__device__ __forceinline__ bool block_any(bool value, int* scratch) {
  const int vote = __any_sync(kFullMask, value);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = vote;
  __syncthreads();
  bool any = false;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) any = any || scratch[w] != 0;
  __syncthreads();
  return any;
}

// The maximum of `value` over the 32 lanes of a full warp (NaN-free inputs), in every lane.
__device__ __forceinline__ float warp_max(float value) {
  for (int offset = 16; offset > 0; offset >>= 1)
    value = max(value, __shfl_xor_sync(kFullMask, value, offset));
  return value;
}

// The maximum of `value` over the block (NaN-free inputs). scratch: float[32].
__device__ __forceinline__ float block_max(float value, float* scratch) {
  value = warp_max(value);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = value;
  __syncthreads();
  float result = scratch[0];
  for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) result = max(result, scratch[w]);
  __syncthreads();
  return result;
}

// The sum of `value` over the 32 lanes of a full warp, by butterfly: every lane gets the same
// bits (each step adds the same two numbers in every lane, and addition commutes).
__device__ __forceinline__ float warp_sum(float value) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(kFullMask, value, offset);
  return value;
}

// Replaces values[0..count) by their sums over the block (count <= N, the same in every thread;
// values[count..N) are left alone). Butterfly within each warp, then a sum over the warps in
// warp order, so every thread gets the same bits. scratch: float[N * 32].
template <int N>
__device__ __forceinline__ void block_sum(float (&values)[N], int count, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if (i < count) {  // uniform: every lane of the warp takes the same branch
      const float v = warp_sum(values[i]);
      if (lane == 0) scratch[i * kMaxWarps + warp] = v;
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if (i < count) {
      float s = 0.f;
      for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) s += scratch[i * kMaxWarps + w];
      values[i] = s;
    }
  }
  __syncthreads();
}

// The sum of `value` over the threads before this one (threadIdx.x order): a block-wide
// exclusive scan. Shuffle-up scan within each warp, then the totals of the earlier warps.
// scratch: int[32].
__device__ __forceinline__ int block_exclusive_scan(int value, int* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int inclusive = value;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int below = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += below;
  }
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  int result = inclusive - value;
  for (int w = 0; w < warp; ++w) result += scratch[w];
  __syncthreads();  // scratch is free again when this returns
  return result;
}

}  // namespace dmax::kernels
