// hybrid_embed: SPEC section 3 step 6, the next input embeddings of the block, in place.
// Semantics: dmax_ext.reference.hybrid_embed_reference.
//
// One block per position (blockIdx.x = b * L + l); positions with nothing to write leave at
// once (the whole block: the flags are the same for all its threads). A hard position copies
// E[id] in vectors of VEC elements. A soft position makes two passes over H in vectors of VEC:
// pass 1 mixes h = sum_i p_i E[t_i] + (1 - sum p) E[mask] in float32 and accumulates the squared
// norms of h and of the k + 1 rows, one block reduction gives the norms and the rescale factor;
// pass 2 recomputes h from the (now cached) rows and stores h * scale in the embedding dtype.
// VEC = 16 bytes of elements when H and every row start allow aligned 16-byte access, else 1.
// Ids outside [0, V) (the wrappers reject them) give a NaN row instead of a wild read.
#pragma once
#include <cstdint>

#include "kernels/block_reduce.cuh"
#include "kernels/device.h"
#include "kernels/float_convert.cuh"

namespace dmax::kernels {

constexpr int kHybridMaxTopK = 8;
constexpr unsigned kHybridMaxThreads = 256;
constexpr int kHybridVectorsPerThread = 2;  // per pass, when H allows

// VEC elements moved as one aligned load/store.
template <class T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <class T, int VEC>
__device__ __forceinline__ void fill_nan(T* out, int vectors) {
  Pack<T, VEC> nan;
#pragma unroll
  for (int e = 0; e < VEC; ++e) nan.v[e] = from_float<T>(NAN);
  for (int v = threadIdx.x; v < vectors; v += blockDim.x) reinterpret_cast<Pack<T, VEC>*>(out)[v] = nan;
}

// h over the VEC elements of vector v; with `norms`, also adds the rows' squares to it
// (layout: [0] h, [1] mask row, [2 + i] row i).
template <class T, int VEC>
__device__ __forceinline__ void mix_vector(const T* const (&rows)[kHybridMaxTopK],
                                           const float (&p)[kHybridMaxTopK], int k,
                                           const T* mask_row, float p_mask, int v,
                                           float (&h)[VEC], float* norms) {
#pragma unroll
  for (int e = 0; e < VEC; ++e) h[e] = 0.f;
#pragma unroll
  for (int i = 0; i < kHybridMaxTopK; ++i) {
    if (i < k) {
      const Pack<T, VEC> r = reinterpret_cast<const Pack<T, VEC>*>(rows[i])[v];
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float x = to_float(r.v[e]);
        h[e] += p[i] * x;
        if (norms) norms[2 + i] += x * x;
      }
    }
  }
  const Pack<T, VEC> m = reinterpret_cast<const Pack<T, VEC>*>(mask_row)[v];
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    const float x = to_float(m.v[e]);
    h[e] += p_mask * x;
    if (norms) {
      norms[1] += x * x;
      norms[0] += h[e] * h[e];
    }
  }
}

template <class T, int VEC>
__global__ void __launch_bounds__(kHybridMaxThreads)
hybrid_embed_kernel(T* __restrict__ embeds, int64_t embeds_stride_b, int64_t embeds_stride_l,
                    const T* __restrict__ weight, int64_t weight_stride, int64_t vocab,
                    const int64_t* __restrict__ ids, const bool* __restrict__ active,
                    const bool* __restrict__ changed, const int64_t* __restrict__ topk_ids,
                    const float* __restrict__ topk_probs, int length, int hidden, int k,
                    int64_t mask_id) {
  __shared__ float scratch[(kHybridMaxTopK + 2) * kMaxWarps];
  const int64_t pos = blockIdx.x;
  const int64_t id = ids[pos];
  const bool soft = active[pos] && id != mask_id;
  if (!soft && !changed[pos]) return;  // untouched: the whole block leaves before any barrier
  T* out = embeds + (pos / length) * embeds_stride_b + (pos % length) * embeds_stride_l;
  const int vectors = hidden / VEC;
  using P = Pack<T, VEC>;

  if (!soft) {  // hard: the new id's own embedding
    if (id < 0 || id >= vocab) return fill_nan<T, VEC>(out, vectors);
    const P* src = reinterpret_cast<const P*>(weight + id * weight_stride);
    for (int v = threadIdx.x; v < vectors; v += blockDim.x) reinterpret_cast<P*>(out)[v] = src[v];
    return;
  }

  const T* rows[kHybridMaxTopK];
  float p[kHybridMaxTopK];
  float p_sum = 0.f;
  bool bad_id = false;
#pragma unroll
  for (int i = 0; i < kHybridMaxTopK; ++i) {
    rows[i] = weight;
    p[i] = 0.f;
    if (i < k) {
      const int64_t t = topk_ids[pos * k + i];
      bad_id = bad_id || t < 0 || t >= vocab;
      rows[i] = weight + (bad_id ? 0 : t) * weight_stride;
      p[i] = topk_probs[pos * k + i];
      p_sum += p[i];
    }
  }
  if (bad_id) return fill_nan<T, VEC>(out, vectors);  // uniform: every thread read the same ids
  const float p_mask = 1.f - p_sum;
  const T* mask_row = weight + mask_id * weight_stride;

  float norms[kHybridMaxTopK + 2];
#pragma unroll
  for (int i = 0; i < kHybridMaxTopK + 2; ++i) norms[i] = 0.f;
  float h[VEC];
  for (int v = threadIdx.x; v < vectors; v += blockDim.x)
    mix_vector<T, VEC>(rows, p, k, mask_row, p_mask, v, h, norms);
  block_sum(norms, k + 2, scratch);

  float target = p_mask * sqrtf(norms[1]);
#pragma unroll
  for (int i = 0; i < kHybridMaxTopK; ++i)
    if (i < k) target += p[i] * sqrtf(norms[2 + i]);
  const float scale = target / (sqrtf(norms[0]) + 1e-6f);

  for (int v = threadIdx.x; v < vectors; v += blockDim.x) {
    mix_vector<T, VEC>(rows, p, k, mask_row, p_mask, v, h, nullptr);
    P o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) o.v[e] = from_float<T>(h[e] * scale);
    reinterpret_cast<P*>(out)[v] = o;
  }
}

// vec: the elements per access the launcher chose (16 / sizeof(T), or 1).
inline LaunchConfig hybrid_embed_launch_config(int64_t batch, int64_t length, int64_t hidden, int vec) {
  const long long vectors = hidden / vec;
  const long long per_thread = (vectors + kHybridVectorsPerThread - 1) / kHybridVectorsPerThread;
  return {dim3(static_cast<unsigned>(batch * length)),
          dim3(block_threads_for(per_thread, kHybridMaxThreads)), 0};
}

}  // namespace dmax::kernels
