// moe_route: a MoE layer's router after its GEMM (the group-limited top-k of SPEC section 1), one
// launch where the torch formulation is ~20 (sigmoid, bias, two top-k, scatter, masked fill,
// gather, normalization, scaling) on a few kilobytes.
// Semantics: dmax_ext.reference (the model's Router without the GEMM), as the CPU kernel
// (csrc/cpu/vec/moe_route_kernel.cpp): scores = sigmoid(logits), biased = scores + bias; a group
// scores the sum of its two best biased scores, the topk_group best groups stay; ids = the top_k
// best biased scores of their experts, descending, the lower id first on ties (groups too);
// weights = scores[ids] / (their sum + 1e-20) when top_k > 1, times scaling.
//
// One warp per token: the lanes compute the row's scores into shared memory, then each group's
// top-2 sum (a lane per group), then topk_group and top_k rounds of a warp argmax (a butterfly
// over (value, index) pairs: every lane gets the same winner), each taking its winner out.
// Shared memory per warp: E scores, E working values (biased, then -inf where taken or outside
// the kept groups), n_group group sums and n_group kept flags.
#pragma once
#include <cmath>
#include <cstdint>

#include "kernels/block_reduce.cuh"
#include "kernels/device.h"

namespace dmax::kernels {

constexpr int kRouteWarps = 4;  // tokens per block
constexpr unsigned kRouteThreads = kRouteWarps * 32;

// The largest value of the warp's (value, index) pairs, the lowest index among equals: the same
// pair in every lane. Lanes with nothing to offer pass (-inf, INT32_MAX).
__device__ __forceinline__ void warp_argmax(float& value, int& index) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other_value = __shfl_xor_sync(kFullMask, value, offset);
    const int other_index = __shfl_xor_sync(kFullMask, index, offset);
    if (other_value > value || (other_value == value && other_index < index)) {
      value = other_value;
      index = other_index;
    }
  }
}

// The best of values[0, n) in the warp (lanes stride over it), taken out (set to -inf).
__device__ __forceinline__ int warp_take_best(float* values, int n) {
  float best = -INFINITY;
  int best_index = INT32_MAX;
  for (int i = threadIdx.x & 31; i < n; i += 32) {
    if (values[i] > best || best_index == INT32_MAX) {  // the first seen on equals (lowest i)
      best = values[i];
      best_index = i;
    }
  }
  // Every lane's reads of values[] fed its shuffles, so they are done before lane 0 writes.
  warp_argmax(best, best_index);
  if ((threadIdx.x & 31) == 0) values[best_index] = -INFINITY;
  __syncwarp();  // the write, before any lane's next scan
  return best_index;
}

// logits [rows, E] float32 contiguous, bias [E] -> ids [rows, top_k] int64, weights float32.
// Dynamic shared memory: kRouteWarps * (2 E + 2 n_group) floats.
__global__ void __launch_bounds__(kRouteThreads)
moe_route_kernel(const float* __restrict__ logits, const float* __restrict__ bias,
                 int64_t* __restrict__ ids, float* __restrict__ weights, int64_t rows, int experts,
                 int n_group, int topk_group, int top_k, float scaling) {
  DMAX_DYNAMIC_SMEM(float, route_smem);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRouteWarps + warp;
  if (row >= rows) return;  // the whole warp
  float* scores = route_smem + warp * (2 * experts + 2 * n_group);
  float* work = scores + experts;
  float* group_sums = work + experts;
  float* kept = group_sums + n_group;  // 1 for the kept groups
  const int per_group = experts / n_group;

  const float* row_logits = logits + row * experts;
  for (int e = lane; e < experts; e += 32) {
    const float score = 1.f / (1.f + expf(-row_logits[e]));
    scores[e] = score;
    work[e] = score + bias[e];
  }
  __syncwarp();
  for (int g = lane; g < n_group; g += 32) {  // the sum of the group's two best
    float first = -INFINITY, second = -INFINITY;
    for (int e = g * per_group; e < (g + 1) * per_group; ++e) {
      const float v = work[e];
      if (v > first) {
        second = first;
        first = v;
      } else if (v > second) {
        second = v;
      }
    }
    group_sums[g] = first + second;
    kept[g] = 0.f;
  }
  __syncwarp();
  for (int j = 0; j < topk_group; ++j) {
    const int g = warp_take_best(group_sums, n_group);
    if (lane == 0) kept[g] = 1.f;
  }
  __syncwarp();
  // Outside the kept groups: each lane masks the experts it scans itself in warp_take_best
  // (e = lane, lane + 32, ...), so no other lane waits on these writes.
  for (int e = lane; e < experts; e += 32)
    if (kept[e / per_group] == 0.f) work[e] = -INFINITY;

  // The picks: every lane knows each winner, so every lane sums their scores in pick order (the
  // CPU kernel's order); lane 0 writes them, then rescales what it wrote.
  int64_t* row_ids = ids + row * top_k;
  float* row_weights = weights + row * top_k;
  float sum = 0.f;
  for (int j = 0; j < top_k; ++j) {
    const int e = warp_take_best(work, experts);
    sum += scores[e];
    if (lane == 0) {
      row_ids[j] = e;
      row_weights[j] = scores[e];
    }
  }
  if (lane == 0) {
    const float denom = sum + 1e-20f;
    for (int j = 0; j < top_k; ++j)
      row_weights[j] = (top_k > 1 ? row_weights[j] / denom : row_weights[j]) * scaling;
  }
}

inline LaunchConfig moe_route_launch_config(int64_t rows, int64_t experts, int64_t n_group) {
  return {dim3(static_cast<unsigned>((rows + kRouteWarps - 1) / kRouteWarps)),
          dim3(kRouteThreads),
          static_cast<size_t>(kRouteWarps * (2 * experts + 2 * n_group)) * sizeof(float)};
}

}  // namespace dmax::kernels
