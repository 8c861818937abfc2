// step_tables: what a cached forward derives from its positions and slots before the layers, as
// one launch where the torch formulation is ~16 small kernels: the slots the fed tokens go to,
// the partial rotary's cos / sin and the block-causal mask over the key span (the replayed CUDA
// graph of a later step computes them from device tensors, the write slot included).
// Semantics: dmax_ext.reference.step_tables_reference (model/modules.py rotary_cos_sin,
// model/attention.py cached_attention_mask):
//   fed[t] = write_slot + t;
//   cos / sin[b, t, j] = T(cos / sin(float(positions[b, t]) * inv_freq[j mod R/2])), float32 math;
//   mask[b, 0, t, s] = s >= valid_from[b] and s < min(block end of fed[t], write_slot + T).
// One block per (sequence, token) row, the threads over the rotary's R values, then the span.
#pragma once
#include <cmath>
#include <cstdint>

#include "kernels/block_reduce.cuh"
#include "kernels/device.h"
#include "kernels/float_convert.cuh"

namespace dmax::kernels {

constexpr unsigned kStepTablesMaxThreads = 256;

template <class T>
__global__ void __launch_bounds__(kStepTablesMaxThreads)
step_tables_kernel(const int64_t* __restrict__ positions, const float* __restrict__ inv_freq,
                   const int64_t* __restrict__ valid_from, const int64_t* __restrict__ write_slot,
                   int64_t* __restrict__ fed, T* __restrict__ cos_out, T* __restrict__ sin_out,
                   bool* __restrict__ mask, int length, int half, int span, int block_length) {
  const int64_t row = blockIdx.x;  // b * length + t
  const int64_t b = row / length, t = row % length;
  const int64_t first = *write_slot, slot = first + t;
  if (b == 0 && threadIdx.x == 0) fed[t] = slot;
  const float position = static_cast<float>(positions[row]);
  const int rotary = 2 * half;
  for (int j = threadIdx.x; j < rotary; j += blockDim.x) {
    const float angle = position * inv_freq[j < half ? j : j - half];
    cos_out[row * rotary + j] = from_float<T>(cosf(angle));
    sin_out[row * rotary + j] = from_float<T>(sinf(angle));
  }
  const int64_t block_end = (slot / block_length + 1) * block_length;
  const int64_t end = block_end < first + length ? block_end : first + length;
  const int64_t start = valid_from[b];
  for (int s = threadIdx.x; s < span; s += blockDim.x)
    mask[row * span + s] = s >= start && s < end;
}

inline LaunchConfig step_tables_launch_config(int64_t rows, int64_t half, int64_t span) {
  const long long work = 2 * half > span ? 2 * half : span;
  return {dim3(static_cast<unsigned>(rows)), dim3(block_threads_for(work, kStepTablesMaxThreads)),
          0};
}

}  // namespace dmax::kernels
