// rms_norm and qk_norm_rotary (and qk_norm_rotary_write_kv): the model's RMSNorm, and the
// attention's q|k head norms followed by the partial rotary embedding (and the KV cache writes
// of a cached forward), each one launch where the torch formulation is 7 (and 6 more, and two
// index_put_) kernels of a few kilobytes each: on a GPU a decoding step is as much launches as
// bytes (docs/PERFORMANCE.md, "GPU projections").
// Semantics: dmax_ext.reference.rms_norm_reference / qk_norm_rotary_reference, rounded where the
// torch formulation rounds (and as the CPU kernel, csrc/cpu/vec/rms_norm_kernel.h):
//   y = T(weight * T(x * rsqrt(mean(x^2) + eps)))
// and for a head, on its first R dims (rotate-half, modules.apply_rotary):
//   out[i] = T(T(y[i] cos[i]) + T(rot[i] sin[i])),  rot = (-y[R/2:R], y[:R/2]);  out[R:] = y[R:].
//
// One warp per row (a token's hidden state, or one head of one token): a row is at most a few
// thousand elements, and a block's 32-64 tokens make enough warps. Lane j takes the elements
// j, j + 32, ... (coalesced); the squares are summed per lane, then across the warp
// (warp_sum: the same bits in every lane), so no __syncthreads and no shared memory but the
// rotary's: a head's y goes through shared memory, where each lane reads its partner element
// rot[i] (another lane's).
#pragma once
#include <cstdint>

#include "kernels/block_reduce.cuh"
#include "kernels/device.h"
#include "kernels/float_convert.cuh"

namespace dmax::kernels {

constexpr int kNormWarps = 4;  // rows per block
constexpr unsigned kNormThreads = kNormWarps * 32;

// 1 / sqrt(mean(x^2) + eps) of the row x[0, n), in every lane of the warp.
template <class T>
__device__ __forceinline__ float warp_inverse_rms(const T* x, int n, float eps) {
  float sum = 0.f;
  for (int i = threadIdx.x & 31; i < n; i += 32) {
    const float v = to_float(x[i]);
    sum += v * v;
  }
  return 1.f / sqrtf(warp_sum(sum) / static_cast<float>(n) + eps);
}

template <class T>
__device__ __forceinline__ float normed(const T* x, const T* weight, int i, float inv_rms) {
  return round_to<T>(to_float(weight[i]) * round_to<T>(to_float(x[i]) * inv_rms));
}

// x: `rows` rows of `hidden` elements, row r at x + r * x_row_stride; out contiguous.
template <class T>
__global__ void __launch_bounds__(kNormThreads)
rms_norm_kernel(const T* __restrict__ x, int64_t x_row_stride, const T* __restrict__ weight,
                T* __restrict__ out, int64_t rows, int hidden, float eps) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kNormWarps + (threadIdx.x >> 5);
  if (row >= rows) return;  // the whole warp: no collective waits for it
  const T* x_row = x + row * x_row_stride;
  const float inv_rms = warp_inverse_rms(x_row, hidden, eps);
  T* out_row = out + row * hidden;
  for (int i = threadIdx.x & 31; i < hidden; i += 32)
    out_row[i] = from_float<T>(normed(x_row, weight, i, inv_rms));
}

// add_rms_norm: a residual add and the RMSNorm after it (a decoder layer's h = x + attention,
// then its post-attention norm): sum = T(x + update) as torch's add rounds it, normed =
// rms_norm(sum). x's rows at x_row_stride, update's contiguous; sum and normed contiguous. The
// sum goes out in the first pass and the second reads it back (each lane its own elements).
template <class T>
__global__ void __launch_bounds__(kNormThreads)
add_rms_norm_kernel(const T* __restrict__ x, int64_t x_row_stride, const T* __restrict__ update,
                    const T* __restrict__ weight, T* __restrict__ sum, T* __restrict__ normed_out,
                    int64_t rows, int hidden, float eps) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kNormWarps + (threadIdx.x >> 5);
  if (row >= rows) return;  // the whole warp
  const T* x_row = x + row * x_row_stride;
  const T* u_row = update + row * hidden;
  T* sum_row = sum + row * hidden;
  float squares = 0.f;
  for (int i = threadIdx.x & 31; i < hidden; i += 32) {
    const T s = from_float<T>(to_float(x_row[i]) + to_float(u_row[i]));
    sum_row[i] = s;
    squares += to_float(s) * to_float(s);
  }
  const float inv_rms = 1.f / sqrtf(warp_sum(squares) / static_cast<float>(hidden) + eps);
  T* out_row = normed_out + row * hidden;
  for (int i = threadIdx.x & 31; i < hidden; i += 32)
    out_row[i] = from_float<T>(normed(sum_row, weight, i, inv_rms));
}

// The KV cache a cached forward writes (qk_norm_rotary_write_kv): keys / values
// [B, n_kv, S, D] at element strides (b, h, s; D contiguous), this call's tokens going to slots
// slots[l] (a device tensor: a captured CUDA graph writes wherever it says at replay).
template <class T>
struct KvCache {
  T* keys = nullptr;
  T* values = nullptr;
  int64_t stride_b = 0, stride_h = 0, stride_s = 0;
  const int64_t* slots = nullptr;
  int64_t n_slots = 0;  // S: a slot outside [0, S) (the wrapper and the CPU op reject it) is
                        // not written
};

// qk [B, L, G, D] at element strides (stride_b, stride_l, stride_g, 1); heads g < n_q_heads use
// q_weight, the others k_weight; cos / sin [B, L, R] contiguous.
// Without a cache: out [B, G, L, D] contiguous, every head.
// With one (kWriteKv): the query heads to out [B, n_q_heads, L, D]; the key heads (G - n_q_heads
// of them) to cache.keys at their slots; and the G - n_q_heads value heads that follow the key
// heads in the input (g in [G, 2 G - n_q_heads), copied as they are) to cache.values.
// Dynamic shared memory: kNormWarps * D floats (each warp's head y).
template <class T, bool kWriteKv>
__global__ void __launch_bounds__(kNormThreads)
qk_norm_rotary_kernel(const T* __restrict__ qk, int64_t stride_b, int64_t stride_l,
                      int64_t stride_g, const T* __restrict__ q_weight,
                      const T* __restrict__ k_weight, const T* __restrict__ cos,
                      const T* __restrict__ sin, T* __restrict__ out, KvCache<T> cache,
                      int64_t batch, int length, int heads, int n_q_heads, int dim, int rotary,
                      float eps) {
  DMAX_DYNAMIC_SMEM(float, heads_y);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rows_per_token = kWriteKv ? 2 * heads - n_q_heads : heads;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kNormWarps + warp;  // (b, l, g)
  if (row >= batch * length * rows_per_token) return;  // the whole warp
  const int g = static_cast<int>(row % rows_per_token);
  const int64_t token = row / rows_per_token;  // b * L + l
  const int64_t b = token / length, l = token % length;
  const T* x = qk + b * stride_b + l * stride_l + g * stride_g;
  const int64_t slot = kWriteKv ? cache.slots[l] : 0;
  if (kWriteKv && g >= n_q_heads && (slot < 0 || slot >= cache.n_slots)) return;
  if (kWriteKv && g >= heads) {  // a value head: copied into the cache
    T* dst = cache.values + b * cache.stride_b + (g - heads) * cache.stride_h +
             slot * cache.stride_s;
    for (int i = lane; i < dim; i += 32) dst[i] = x[i];
    return;
  }
  const T* weight = g < n_q_heads ? q_weight : k_weight;
  const float inv_rms = warp_inverse_rms(x, dim, eps);

  float* y = heads_y + warp * dim;
  for (int i = lane; i < dim; i += 32) y[i] = normed(x, weight, i, inv_rms);
  __syncwarp();  // the rotary reads other lanes' y

  const T* cos_row = cos + token * rotary;
  const T* sin_row = sin + token * rotary;
  const int half = rotary / 2;
  T* out_row;
  if (kWriteKv && g >= n_q_heads) {
    out_row = cache.keys + b * cache.stride_b + (g - n_q_heads) * cache.stride_h +
              slot * cache.stride_s;
  } else {
    const int out_heads = kWriteKv ? n_q_heads : heads;
    out_row = out + ((b * out_heads + g) * length + l) * dim;
  }
  for (int i = lane; i < dim; i += 32) {
    float v = y[i];
    if (i < rotary) {
      const float rot = i < half ? -y[i + half] : y[i - half];
      v = round_to<T>(v * to_float(cos_row[i])) + round_to<T>(rot * to_float(sin_row[i]));
    }
    out_row[i] = from_float<T>(v);
  }
}

inline LaunchConfig norm_launch_config(int64_t rows, int64_t smem_floats_per_warp) {
  return {dim3(static_cast<unsigned>((rows + kNormWarps - 1) / kNormWarps)), dim3(kNormThreads),
          static_cast<size_t>(kNormWarps * smem_floats_per_warp) * sizeof(float)};
}

}  // namespace dmax::kernels
