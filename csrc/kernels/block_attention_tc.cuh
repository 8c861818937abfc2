// block_attention on tensor cores (nvcuda::wmma, m16n16k16): the 16-bit path of the same op as
// block_attention.cuh, with the same semantics (dmax_ext.reference.block_attention_reference),
// work split over keys and float32 workspace, so the splits are merged by
// block_attention_combine_kernel.
//
// Why: the CUDA-core kernel reads shared memory for every multiply-add (about a fifth of the
// FP32 peak), and a decoding block's attention is 2 x 32 x heads x D multiply-adds per key; at
// LLaDA2.0-mini's 16 heads of 128 and a few thousand cached slots per sequence that is
// gigaflops a step, at batch 8 a third of a step's projected time (docs/PERFORMANCE.md). A warp
// here multiplies 16 query rows by 32 keys with 2 D / 16 tensor-core products and the
// probabilities by the values with 4 D / 16.
//
// Work split: a block is one (sequence, key head) and kTcRows query rows of its group of query
// heads (row r of the group: head r / T, token r % T), so each key and value tile is read from
// global memory once for up to kTcRows rows of every head sharing it (grouped-query attention),
// where the CUDA-core kernel reads it once per head. Each warp owns 16 rows:
//   scores S [16 x 32] = Q [16 x D] K^T, Q held in matrix_a fragments for the whole kernel
//     (unscaled: the products of 16-bit inputs are exact; S is scaled in float32);
//   an online softmax per row in float32 over S staged in shared memory (two lanes a row);
//   P V with P split in two 16-bit terms, hi = T(p) and lo = T(p - hi) (together ~16 bits of
//     p for bfloat16, 22 for float16), so the sum keeps float32's accuracy where one 16-bit P
//     (flash attention's choice) would cost a 16-bit rounding of every probability: the outputs
//     must be the reference's bits on >= 99% of elements (tests/test_block_attention_kernel.py);
//   the tile's sums staged through shared memory 16 dims at a time and added to the running
//     output held in registers (a fragment's layout is unspecified, so rows are rescaled there).
// Requires D a multiple of 16, D <= kAttnMaxHeadDim; the launcher picks this kernel for 16-bit
// inputs on such dims (block_attention.cu), the CUDA-core one otherwise.
#pragma once
#include <cstdint>

#include "kernels/block_attention.cuh"
#include "kernels/device.h"
#include "kernels/float_convert.cuh"

namespace dmax::kernels {

constexpr int kTcWarps = 4;
constexpr int kTcRowsPerWarp = 16;                 // one fragment's rows
constexpr int kTcRows = kTcWarps * kTcRowsPerWarp;  // query rows of one block
constexpr int kTcKeyTile = 32;                     // two fragments' columns
constexpr int kTcMaxChunks = kAttnMaxHeadDim / 16;
// Shared-memory pitches in elements: multiples of 16 bytes (wmma's ldm), and each fragment's
// first element 32-byte aligned (wmma's pointers) given 16-row and 16-column offsets.
constexpr int kTcScorePitch = kTcKeyTile + 4;  // float S [16][.]
constexpr int kTcProbPitch = kTcKeyTile + 8;   // 16-bit P hi / lo [16][.]
constexpr int kTcOutPitch = 16 + 4;            // float tile sums [16][.], one 16-dim chunk

__host__ __device__ constexpr int tc_tile_pitch(int dim) { return dim + 8; }  // 16-bit [.][D]

// Bytes of one warp's scratch: S, P hi, P lo, a chunk of the tile's sums.
constexpr int kTcWarpBytes = kTcRowsPerWarp * (kTcScorePitch * 4 + 2 * kTcProbPitch * 2 +
                                               kTcOutPitch * 4);

inline size_t block_attention_tc_smem_bytes(int64_t dim) {
  const size_t tile = static_cast<size_t>(kTcKeyTile) * tc_tile_pitch(static_cast<int>(dim)) * 2;
  const size_t q = static_cast<size_t>(kTcRows) * tc_tile_pitch(static_cast<int>(dim)) * 2;
  const size_t warps = static_cast<size_t>(kTcWarps) * kTcWarpBytes;
  return 2 * tile + (q > warps ? q : warps);  // Q is staged where the warps' scratch goes later
}

inline bool block_attention_tc_supports(int64_t dim) {
  return dim > 0 && dim % 16 == 0 && dim <= kAttnMaxHeadDim;
}

// A warp copies one row of D 16-bit elements from global to shared memory (src null: zeros):
// 16 bytes a lane per load where kVec (the launcher checked every row start 16-byte aligned),
// else one element a lane per load, 8 times the load instructions.
template <class T, bool kVec>
__device__ __forceinline__ void copy_row(T* dst, const T* src, int D, int lane) {
  if constexpr (kVec) {
    constexpr int kPer = 16 / sizeof(T);
    for (int v = lane; v < D / kPer; v += 32)
      reinterpret_cast<uint4*>(dst)[v] =
          src ? reinterpret_cast<const uint4*>(src)[v] : make_uint4(0u, 0u, 0u, 0u);
  } else {
    for (int d = lane; d < D; d += 32) dst[d] = src ? src[d] : from_float<T>(0.f);
  }
}

// Whether every row the kernel copies starts 16-byte aligned: copy_row's vector form.
template <class T>
inline bool block_attention_tc_vector_rows(const T* q, const T* keys, const T* values,
                                           const AttnStrides& st) {
  constexpr int64_t kPer = 16 / sizeof(T);
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  for (const int64_t stride : {st.q_b, st.q_h, st.q_t, st.k_b, st.k_h, st.k_s, st.v_b, st.v_h,
                               st.v_s})
    if (stride % kPer != 0) return false;
  return aligned(q) && aligned(keys) && aligned(values);
}

// grid (splits, ceil(group * T / kTcRows), batch * kv_heads), kTcWarps * 32 threads, dynamic
// shared memory block_attention_tc_smem_bytes(dim). Outputs as block_attention_kernel's.
template <class T, bool kVec>
__global__ void __launch_bounds__(kTcWarps * 32)
block_attention_tc_kernel(const T* __restrict__ q, const T* __restrict__ keys,
                          const T* __restrict__ values, const bool* __restrict__ mask,
                          AttnStrides st, AttnShape sh, float scale, T* __restrict__ out,
                          float* __restrict__ partial_sums, float* __restrict__ partial_ml) {
  namespace wmma = nvcuda::wmma;
  DMAX_DYNAMIC_SMEM(unsigned char, smem);
  const int D = sh.dim, chunks = D / 16, pitch = tc_tile_pitch(D);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group = sh.heads / sh.kv_heads, group_rows = group * sh.length;
  const int split = blockIdx.x, kv_head = blockIdx.z % sh.kv_heads, b = blockIdx.z / sh.kv_heads;
  const int row0 = blockIdx.y * kTcRows;
  T* k_s = reinterpret_cast<T*>(smem);                        // [kTcKeyTile][pitch]
  T* v_s = k_s + kTcKeyTile * pitch;                          // [kTcKeyTile][pitch]
  unsigned char* shared_tail = smem + 2 * kTcKeyTile * pitch * sizeof(T);
  T* q_s = reinterpret_cast<T*>(shared_tail);                 // [kTcRows][pitch], first
  unsigned char* mine = shared_tail + warp * kTcWarpBytes;     // then the warps' scratch
  float* s_s = reinterpret_cast<float*>(mine);
  T* p_hi = reinterpret_cast<T*>(s_s + kTcRowsPerWarp * kTcScorePitch);
  T* p_lo = p_hi + kTcRowsPerWarp * kTcProbPitch;
  float* o_s = reinterpret_cast<float*>(p_lo + kTcRowsPerWarp * kTcProbPitch);

  // Q rows of the block (zeros past the group's rows), then each warp's 16 as fragments.
  for (int r = warp; r < kTcRows; r += kTcWarps) {
    const int g = row0 + r;
    const int head = kv_head * group + g / sh.length, t = g % sh.length;
    copy_row<T, kVec>(q_s + r * pitch,
                      g < group_rows ? q + b * st.q_b + head * st.q_h + t * st.q_t : nullptr, D,
                      lane);
  }
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> q_frag[kTcMaxChunks];
#pragma unroll
  for (int c = 0; c < kTcMaxChunks; ++c)
    if (c < chunks) wmma::load_matrix_sync(q_frag[c], q_s + warp * kTcRowsPerWarp * pitch + 16 * c,
                                           pitch);

  // This lane's row of the warp's 16 and its half of the row's columns (keys, then dims).
  const int my_row = lane >> 1, half = lane & 1;
  const int g = row0 + warp * kTcRowsPerWarp + my_row;
  const bool row_valid = g < group_rows;
  const int head = kv_head * group + g / sh.length, t = g % sh.length;
  const bool* m_row = mask + b * st.m_b + static_cast<int64_t>(row_valid ? t : 0) * st.m_t;
  float m = -INFINITY, l = 0.f, o_run[kTcMaxChunks][8];
#pragma unroll
  for (int c = 0; c < kTcMaxChunks; ++c)
#pragma unroll
    for (int i = 0; i < 8; ++i) o_run[c][i] = 0.f;

  const T* k_base = keys + b * st.k_b + kv_head * st.k_h;
  const T* v_base = values + b * st.v_b + kv_head * st.v_h;
  const int first_key = split * sh.keys_per_split;
  const int end_key = min(first_key + sh.keys_per_split, sh.slots);
  for (int tile = first_key; tile < end_key; tile += kTcKeyTile) {
    __syncthreads();  // every warp is done with the previous tile (and with q_s)
    for (int j = warp; j < kTcKeyTile; j += kTcWarps) {
      const int s = tile + j;
      const bool in = s < end_key;
      copy_row<T, kVec>(k_s + j * pitch, in ? k_base + s * st.k_s : nullptr, D, lane);
      copy_row<T, kVec>(v_s + j * pitch, in ? v_base + s * st.v_s : nullptr, D, lane);
    }
    __syncthreads();

    // S = Q K^T: K's rows are K^T's columns (a column-major matrix_b).
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
#pragma unroll
    for (int n = 0; n < kTcKeyTile / 16; ++n) {
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int c = 0; c < kTcMaxChunks; ++c) {
        if (c >= chunks) break;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> k_frag;
        wmma::load_matrix_sync(k_frag, k_s + 16 * n * pitch + 16 * c, pitch);
        wmma::mma_sync(acc, q_frag[c], k_frag, acc);
      }
      wmma::store_matrix_sync(s_s + 16 * n, acc, kTcScorePitch, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax of this lane's row over its 16 keys, the row's other half on lane ^ 1.
    float score[16], tile_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int col = 16 * half + j, s = tile + col;
      const bool allowed = row_valid && s < end_key && m_row[s * st.m_s];
      score[j] = allowed ? s_s[my_row * kTcScorePitch + col] * scale : -INFINITY;
      tile_max = fmaxf(tile_max, score[j]);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, 1));
    const float m_new = fmaxf(m, tile_max);
    // Nothing allowed so far: p = 0 and the state stays empty (alpha would be NaN).
    const float alpha = m_new == -INFINITY ? 1.f : expf(m - m_new);
    float p_sum = 0.f;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const float p = score[j] == -INFINITY ? 0.f : expf(score[j] - m_new);
      const T hi = from_float<T>(p);
      p_hi[my_row * kTcProbPitch + 16 * half + j] = hi;
      p_lo[my_row * kTcProbPitch + 16 * half + j] = from_float<T>(p - to_float(hi));
      p_sum += p;
    }
    p_sum += __shfl_xor_sync(kFullMask, p_sum, 1);
    m = m_new;
    l = l * alpha + p_sum;
    __syncwarp();

    // The tile's sums P V, 16 dims at a time, added to the running output.
#pragma unroll
    for (int c = 0; c < kTcMaxChunks; ++c) {
      if (c >= chunks) break;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int kk = 0; kk < kTcKeyTile / 16; ++kk) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> v_frag;
        wmma::load_matrix_sync(v_frag, v_s + 16 * kk * pitch + 16 * c, pitch);
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> p_frag;
        wmma::load_matrix_sync(p_frag, p_hi + 16 * kk, kTcProbPitch);
        wmma::mma_sync(acc, p_frag, v_frag, acc);
        wmma::load_matrix_sync(p_frag, p_lo + 16 * kk, kTcProbPitch);
        wmma::mma_sync(acc, p_frag, v_frag, acc);
      }
      wmma::store_matrix_sync(o_s, acc, kTcOutPitch, wmma::mem_row_major);
      __syncwarp();
#pragma unroll
      for (int i = 0; i < 8; ++i)
        o_run[c][i] = fmaf(o_run[c][i], alpha, o_s[my_row * kTcOutPitch + 8 * half + i]);
      __syncwarp();  // read before the next chunk's store
    }
  }

  if (!row_valid) return;
  if (sh.splits == 1) {
    const float inv = l > 0.f ? 1.f / l : 0.f;  // no slot allowed: zeros
    T* o = out + (static_cast<int64_t>(b) * sh.length + t) * sh.heads * D + head * D;
#pragma unroll
    for (int c = 0; c < kTcMaxChunks; ++c) {
      if (c >= chunks) break;
#pragma unroll
      for (int i = 0; i < 8; ++i) o[16 * c + 8 * half + i] = from_float<T>(o_run[c][i] * inv);
    }
    return;
  }
  const int64_t slot = ((static_cast<int64_t>(b) * sh.heads + head) * sh.length + t) *
                           sh.splits + split;
#pragma unroll
  for (int c = 0; c < kTcMaxChunks; ++c) {
    if (c >= chunks) break;
#pragma unroll
    for (int i = 0; i < 8; ++i) partial_sums[slot * D + 16 * c + 8 * half + i] = o_run[c][i];
  }
  if (half == 0) {
    partial_ml[slot * 2] = m;
    partial_ml[slot * 2 + 1] = l;
  }
}

// Blocks of query rows: kTcRows rows of one (sequence, key head)'s group of query heads each.
inline long long block_attention_tc_row_blocks(const AttnShape& sh) {
  const long long group_rows = static_cast<long long>(sh.heads / sh.kv_heads) * sh.length;
  return static_cast<long long>(sh.batch) * sh.kv_heads * ((group_rows + kTcRows - 1) / kTcRows);
}

inline LaunchConfig block_attention_tc_launch_config(const AttnShape& sh) {
  const int group_rows = sh.heads / sh.kv_heads * sh.length;
  return {dim3(static_cast<unsigned>(sh.splits),
               static_cast<unsigned>((group_rows + kTcRows - 1) / kTcRows),
               static_cast<unsigned>(sh.batch * sh.kv_heads)),
          dim3(kTcWarps * 32), block_attention_tc_smem_bytes(sh.dim)};
}

}  // namespace dmax::kernels
