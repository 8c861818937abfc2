// block_attention: a decoding block's attention over the KV cache, softmax(scale q k^T) v over
// the slots a bool mask allows, with grouped query heads, as [B, T, heads * D]: the layout the
// output projection reads. On CUDA, torch's SDPA cannot run this call on a fused kernel (flash
// attention takes no mask; memory-efficient attention takes no grouped heads; cuDNN attention
// comes after the math path in the default order) and falls back to its math path: the keys
// and values repeated per query head, two batched products, the mask, the softmax, several
// launches, then a transpose copy for the projection.
// Semantics: dmax_ext.reference.block_attention_reference (float32 scores, softmax and sums, the
// output rounded once; a query that may attend no slot gets zeros).
//
// Work split (flash-decoding): a block takes kAttnRows query rows of one (sequence, query head)
// and a run of key tiles; each warp owns kAttnRowsPerWarp rows, and each lane one key of the
// 32-key tile for the scores, then D / 32 output dims (lane + 32 i) for the weighted sum of
// values. A row keeps an online softmax (running max m, running sum l, unnormalized sums).
// A decoding step has few rows (32 tokens x heads) and a long key span, so the keys are split
// over blocks too (`splits`, chosen by the launcher to fill the device): with one split a block
// writes the normalized output; with more each writes its (m, l, sums) to a float32 workspace
// and block_attention_combine_kernel merges them (a second launch).
#pragma once
#include <cstdint>

#include "kernels/block_reduce.cuh"
#include "kernels/device.h"
#include "kernels/float_convert.cuh"

namespace dmax::kernels {

constexpr int kAttnWarps = 4;
constexpr int kAttnRowsPerWarp = 4;
constexpr int kAttnRows = kAttnWarps * kAttnRowsPerWarp;  // query rows of one block
constexpr int kAttnKeyTile = 32;                           // one key per lane
constexpr int kAttnMaxHeadDim = 128;                       // shared memory: ~40 KB at 128
constexpr int kAttnDimsPerLane = kAttnMaxHeadDim / 32;
constexpr int kAttnMinKeysPerSplit = 64;  // a split's keys: at least two tiles of work
constexpr int kAttnMaxSplits = 64;        // bounds the workspace

// Element strides of the operands (the last dim of q, keys and values is contiguous).
struct AttnStrides {
  int64_t q_b, q_h, q_t;
  int64_t k_b, k_h, k_s;
  int64_t v_b, v_h, v_s;
  int64_t m_b, m_t, m_s;  // mask [B or 1, 1, T, S]: m_b = 0 when shared by the batch
};

struct AttnShape {
  int batch, heads, kv_heads, length, slots, dim;
  int splits, keys_per_split;  // keys_per_split: a multiple of kAttnKeyTile
};

// score[r] = q[r] . k over D for a warp's kAttnRowsPerWarp query rows (q: [rows][D], k: one
// key's row), each in kDotChains interleaved fused multiply-add chains summed pairwise: a
// score's error becomes its probability's relative error, and a sequential float32 sum's error
// grows with D (GEMM kernels sum in vector lanes too). Each k element is read once for all the
// rows (1.25 shared-memory reads a multiply-add, not 2), and the chains are independent.
constexpr int kDotChains = 8;
__device__ __forceinline__ void dot_rows(const float* q, const float* k, int D,
                                         float (&score)[kAttnRowsPerWarp]) {
  float part[kAttnRowsPerWarp][kDotChains] = {};
  int d = 0;
  for (; d + kDotChains <= D; d += kDotChains) {
#pragma unroll
    for (int c = 0; c < kDotChains; ++c) {
      const float kv = k[d + c];
#pragma unroll
      for (int r = 0; r < kAttnRowsPerWarp; ++r)
        part[r][c] = fmaf(q[r * D + d + c], kv, part[r][c]);
    }
  }
  // The tail (D not a multiple of the chains) into chain 0: a chain picked at run time would
  // index the array dynamically and move it from registers to local memory.
  for (; d < D; ++d) {
    const float kv = k[d];
#pragma unroll
    for (int r = 0; r < kAttnRowsPerWarp; ++r) part[r][0] = fmaf(q[r * D + d], kv, part[r][0]);
  }
#pragma unroll
  for (int r = 0; r < kAttnRowsPerWarp; ++r) {
#pragma unroll
    for (int width = kDotChains / 2; width > 0; width /= 2) {
#pragma unroll
      for (int c = 0; c < width; ++c) part[r][c] += part[r][c + width];
    }
    score[r] = part[r][0];
  }
}

// grid (splits, ceil(T / kAttnRows) * heads, batch), kAttnWarps * 32 threads, dynamic shared
// memory block_attention_smem_bytes(dim). With splits == 1 writes out [B, T, heads * D]; else
// partial_sums [B, heads, T, splits, D] and partial_ml [B, heads, T, splits, 2] (max, sum).
template <class T>
__global__ void __launch_bounds__(kAttnWarps * 32)
block_attention_kernel(const T* __restrict__ q, const T* __restrict__ keys,
                       const T* __restrict__ values, const bool* __restrict__ mask,
                       AttnStrides st, AttnShape sh, float scale, T* __restrict__ out,
                       float* __restrict__ partial_sums, float* __restrict__ partial_ml) {
  DMAX_DYNAMIC_SMEM(float, attn_smem);
  const int D = sh.dim, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row_tiles = (sh.length + kAttnRows - 1) / kAttnRows;
  const int split = blockIdx.x, head = blockIdx.y / row_tiles, b = blockIdx.z;
  const int row0 = (blockIdx.y % row_tiles) * kAttnRows;
  const int kv_head = head / (sh.heads / sh.kv_heads);
  float* q_s = attn_smem;                    // [kAttnRows][D], scaled
  float* k_s = q_s + kAttnRows * D;          // [kAttnKeyTile][D + 1]: lanes read rows, no conflict
  float* v_s = k_s + kAttnKeyTile * (D + 1);  // [kAttnKeyTile][D]: lanes read along D

  // Rows by warp and D by lane: no division per element, and each warp's loads contiguous.
  for (int r = warp; r < kAttnRows; r += kAttnWarps) {
    const int t = row0 + r;
    for (int d = lane; d < D; d += 32) {
      // (q.float() * scale) as the reference: the product rounded to float32, then the dots.
      q_s[r * D + d] = t < sh.length
                           ? __fmul_rn(to_float(q[b * st.q_b + head * st.q_h + t * st.q_t + d]),
                                       scale)
                           : 0.f;
    }
  }
  float m[kAttnRowsPerWarp], l[kAttnRowsPerWarp], acc[kAttnRowsPerWarp][kAttnDimsPerLane];
#pragma unroll
  for (int r = 0; r < kAttnRowsPerWarp; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int i = 0; i < kAttnDimsPerLane; ++i) acc[r][i] = 0.f;
  }
  const T* k_base = keys + b * st.k_b + kv_head * st.k_h;
  const T* v_base = values + b * st.v_b + kv_head * st.v_h;
  const bool* m_base = mask + b * st.m_b;
  const int first_key = split * sh.keys_per_split;
  const int end_key = min(first_key + sh.keys_per_split, sh.slots);
  for (int tile = first_key; tile < end_key; tile += kAttnKeyTile) {
    __syncthreads();  // the previous tile's k_s / v_s are read by every warp (and q_s written)
    for (int j = warp; j < kAttnKeyTile; j += kAttnWarps) {
      const int s = tile + j;
      const bool in = s < end_key;
      for (int d = lane; d < D; d += 32) {
        k_s[j * (D + 1) + d] = in ? to_float(k_base[s * st.k_s + d]) : 0.f;
        v_s[j * D + d] = in ? to_float(v_base[s * st.v_s + d]) : 0.f;
      }
    }
    __syncthreads();
    const int s = tile + lane;
    float scores[kAttnRowsPerWarp];  // rows past T score their zero q_s rows, unused
    dot_rows(q_s + warp * kAttnRowsPerWarp * D, k_s + lane * (D + 1), D, scores);
#pragma unroll
    for (int r = 0; r < kAttnRowsPerWarp; ++r) {
      const int t = row0 + warp * kAttnRowsPerWarp + r;
      if (t >= sh.length) continue;  // uniform in the warp
      const bool allowed = s < end_key && m_base[t * st.m_t + s * st.m_s];
      const float score = allowed ? scores[r] : -INFINITY;
      const float m_new = fmaxf(m[r], warp_max(score));
      if (m_new == -INFINITY) continue;  // nothing allowed so far: the state stays empty
      const float p = allowed ? expf(score - m_new) : 0.f;
      const float alpha = expf(m[r] - m_new);  // 0 while the row was empty
      m[r] = m_new;
      l[r] = l[r] * alpha + warp_sum(p);
      // The tile's sums first, then added to the running ones: ~32 + S/32 roundings in a chain
      // where one chain over the S keys had ~S.
      float tile_sums[kAttnDimsPerLane] = {};
      for (int j = 0; j < kAttnKeyTile; ++j) {
        const float pj = __shfl_sync(kFullMask, p, j);
#pragma unroll
        for (int i = 0; i < kAttnDimsPerLane; ++i) {
          const int d = lane + 32 * i;
          if (d < D) tile_sums[i] = fmaf(pj, v_s[j * D + d], tile_sums[i]);
        }
      }
#pragma unroll
      for (int i = 0; i < kAttnDimsPerLane; ++i) acc[r][i] = fmaf(acc[r][i], alpha, tile_sums[i]);
    }
  }
#pragma unroll
  for (int r = 0; r < kAttnRowsPerWarp; ++r) {
    const int t = row0 + warp * kAttnRowsPerWarp + r;
    if (t >= sh.length) continue;
    if (sh.splits == 1) {
      const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;  // no slot allowed: zeros
      T* o = out + (static_cast<int64_t>(b) * sh.length + t) * sh.heads * D + head * D;
#pragma unroll
      for (int i = 0; i < kAttnDimsPerLane; ++i) {
        const int d = lane + 32 * i;
        if (d < D) o[d] = from_float<T>(acc[r][i] * inv);
      }
      continue;
    }
    const int64_t slot = ((static_cast<int64_t>(b) * sh.heads + head) * sh.length + t) *
                             sh.splits + split;
#pragma unroll
    for (int i = 0; i < kAttnDimsPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < D) partial_sums[slot * D + d] = acc[r][i];
    }
    if (lane == 0) {
      partial_ml[slot * 2] = m[r];
      partial_ml[slot * 2 + 1] = l[r];
    }
  }
}

// grid (T, heads, batch), block_threads_for(D, ...) threads: out[b, t, head * D + d] = the
// splits' sums rescaled to their common max, over their rescaled total.
template <class T>
__global__ void __launch_bounds__(kAttnMaxHeadDim)
block_attention_combine_kernel(const float* __restrict__ partial_sums,
                               const float* __restrict__ partial_ml, AttnShape sh,
                               T* __restrict__ out) {
  const int t = blockIdx.x, head = blockIdx.y, b = blockIdx.z, D = sh.dim;
  const int64_t first = ((static_cast<int64_t>(b) * sh.heads + head) * sh.length + t) * sh.splits;
  const float* ml = partial_ml + first * 2;
  float m = -INFINITY;
  for (int c = 0; c < sh.splits; ++c) m = fmaxf(m, ml[2 * c]);
  float total = 0.f;
  if (m != -INFINITY) {
    for (int c = 0; c < sh.splits; ++c) total += expf(ml[2 * c] - m) * ml[2 * c + 1];
  }
  T* o = out + (static_cast<int64_t>(b) * sh.length + t) * sh.heads * D + head * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float sum = 0.f;
    if (m != -INFINITY) {
      for (int c = 0; c < sh.splits; ++c)
        sum += expf(ml[2 * c] - m) * partial_sums[(first + c) * D + d];
    }
    o[d] = from_float<T>(total > 0.f ? sum / total : 0.f);  // no slot allowed: zeros
  }
}

inline size_t block_attention_smem_bytes(int64_t dim) {
  return static_cast<size_t>(kAttnRows * dim + kAttnKeyTile * (dim + 1) + kAttnKeyTile * dim) *
         sizeof(float);
}

// Blocks of query rows of the CUDA-core kernel (one head, kAttnRows tokens each).
inline long long block_attention_row_blocks(const AttnShape& sh) {
  return static_cast<long long>(sh.batch) * sh.heads * ((sh.length + kAttnRows - 1) / kAttnRows);
}

// Splits of the keys for a kernel with `row_blocks` blocks of query rows: enough blocks to give
// each of the device's multiprocessors two, without splits shorter than kAttnMinKeysPerSplit
// keys or more than kAttnMaxSplits. Sets sh.splits and sh.keys_per_split.
inline void choose_block_attention_splits(AttnShape& sh, int multiprocessors,
                                          long long row_blocks) {
  const long long wanted = (2LL * multiprocessors + row_blocks - 1) / row_blocks;
  const long long by_keys = (sh.slots + kAttnMinKeysPerSplit - 1) / kAttnMinKeysPerSplit;
  long long splits = wanted < by_keys ? wanted : by_keys;
  splits = splits < 1 ? 1 : (splits > kAttnMaxSplits ? kAttnMaxSplits : splits);
  long long per = (sh.slots + splits - 1) / splits;
  per = (per + kAttnKeyTile - 1) / kAttnKeyTile * kAttnKeyTile;
  sh.keys_per_split = static_cast<int>(per < kAttnKeyTile ? kAttnKeyTile : per);
  sh.splits = static_cast<int>((sh.slots + sh.keys_per_split - 1) / sh.keys_per_split);
  if (sh.splits < 1) sh.splits = 1;
}

inline LaunchConfig block_attention_launch_config(const AttnShape& sh) {
  const unsigned row_tiles = static_cast<unsigned>((sh.length + kAttnRows - 1) / kAttnRows);
  return {dim3(static_cast<unsigned>(sh.splits), row_tiles * static_cast<unsigned>(sh.heads),
               static_cast<unsigned>(sh.batch)),
          dim3(kAttnWarps * 32), block_attention_smem_bytes(sh.dim)};
}

inline LaunchConfig block_attention_combine_launch_config(const AttnShape& sh) {
  return {dim3(static_cast<unsigned>(sh.length), static_cast<unsigned>(sh.heads),
               static_cast<unsigned>(sh.batch)),
          dim3(block_threads_for(sh.dim, kAttnMaxHeadDim)), 0};
}

}  // namespace dmax::kernels
