// Raw-pointer launchers of the CUDA kernels, one per op (csrc/cuda/<op>.cu). No torch headers:
// the .cu files compile quickly under nvcc, and unchanged as host C++ in the simt build.
// Pointers are device pointers (host pointers in the simt build); shapes are element counts.
// Each launcher checks the launch (DMAX_CHECK_LAUNCH) and throws std::runtime_error on failure.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(DMAX_SIMT) || defined(__CUDACC__)
#include "kernels/device.h"  // cudaStream_t (the emulation's, or CUDA's)
#else
#include <cuda_runtime_api.h>
#endif

// After a launch: cudaGetLastError in the CUDA build (bad configuration, missing kernel image);
// nothing under simt, whose launcher throws simt::Error itself.
#if defined(__CUDACC__)
#define DMAX_CHECK_LAUNCH(op_name)                                                      \
  do {                                                                                  \
    const cudaError_t dmax_launch_err_ = cudaGetLastError();                            \
    if (dmax_launch_err_ != cudaSuccess)                                                \
      throw std::runtime_error(std::string("dmax: ") + (op_name) +                      \
                               " kernel launch failed: " + cudaGetErrorString(dmax_launch_err_)); \
  } while (0)
#else
#define DMAX_CHECK_LAUNCH(op_name) ((void)(op_name))
#endif

namespace dmax {

// The floating-point element types the kernels are instantiated for.
enum class FloatType { kFloat32, kFloat16, kBFloat16 };

// ---- logits_stats / onpolicy_noise (csrc/cuda/logits_stats.cu, csrc/cuda/onpolicy_noise.cu) ----

// logits [B * L, V] contiguous of `dtype`; seeds [B] (read only when temperature > 0);
// outputs pred [B * L], conf [B * L], topk_ids [B * L, k], topk_probs [B * L, k].
void launch_logits_stats(const void* logits, FloatType dtype, int64_t batch, int64_t length,
                         int64_t vocab, int k, double temperature, const int64_t* seeds,
                         int64_t* pred, float* conf, int64_t* topk_ids, float* topk_probs,
                         cudaStream_t stream);

// noisy_ids [B, L], sample_flags [B], topk_ids / topk_probs [B, L, k], seeds [B] (read only when
// temperature > 0 and k > 1) -> new_ids [B, L].
void launch_onpolicy_noise(const int64_t* noisy_ids, const bool* sample_flags,
                           const int64_t* topk_ids, const float* topk_probs, int64_t batch,
                           int64_t length, int k, double temperature, const int64_t* seeds,
                           int64_t mask_id, int64_t* new_ids, cudaStream_t stream);

}  // namespace dmax

namespace dmax {

// ---- promote / spd_update / hybrid_embed (csrc/cuda/{promote,spd_update,hybrid_embed}.cu) ----
// ids/pred int64, conf float32, flags bool, all [batch, length] contiguous.
void launch_promote(const int64_t* ids, const float* conf, const int64_t* pred, bool* promoted,
                    int64_t batch, int64_t length, float threshold, int64_t mask_id, bool prefix,
                    cudaStream_t stream);
void launch_spd_update(const int64_t* ids, const bool* active, const bool* promoted,
                       const int64_t* pred, const float* conf, int64_t batch, int64_t length,
                       float accept_threshold, int64_t mask_id, int64_t* new_ids, bool* changed,
                       bool* converged, cudaStream_t stream);
// embeds [batch, length, hidden] (strides in elements, last dimension contiguous) and weight
// [vocab, hidden] share `dtype`; ids/active/changed [batch, length] and topk_ids/topk_probs
// [batch, length, k] are contiguous.
struct HybridEmbedArgs {
  void* embeds = nullptr;
  FloatType dtype = FloatType::kFloat32;
  int64_t embeds_stride_b = 0, embeds_stride_l = 0;
  const void* weight = nullptr;
  int64_t weight_stride = 0, vocab = 0;
  const int64_t* ids = nullptr;
  const bool* active = nullptr;
  const bool* changed = nullptr;
  const int64_t* topk_ids = nullptr;
  const float* topk_probs = nullptr;
  int64_t batch = 0, length = 0, hidden = 0, k = 0, mask_id = 0;
};
void launch_hybrid_embed(const HybridEmbedArgs& args, cudaStream_t stream);

}  // namespace dmax

namespace dmax {

// ---- rms_norm / qk_norm_rotary / swiglu (csrc/cuda/{norms,swiglu}.cu) ----
// x: `rows` rows of `hidden` elements of `dtype`, row r at x + r * x_row_stride elements;
// weight [hidden]; out [rows, hidden] contiguous.
void launch_rms_norm(const void* x, int64_t x_row_stride, const void* weight, void* out,
                     FloatType dtype, int64_t rows, int64_t hidden, float eps,
                     cudaStream_t stream);
// add_rms_norm: x rows at x_row_stride, update [rows, hidden] -> sum, normed [rows, hidden], all
// contiguous but x, of `dtype`; weight [hidden].
void launch_add_rms_norm(const void* x, int64_t x_row_stride, const void* update,
                         const void* weight, void* sum, void* normed, FloatType dtype,
                         int64_t rows, int64_t hidden, float eps, cudaStream_t stream);
// qk [batch, length, heads, dim] at element strides (stride_b, stride_l, stride_g, 1);
// q_weight / k_weight [dim]; cos / sin [batch, length, rotary] contiguous;
// out [batch, heads, length, dim] contiguous. All of `dtype`.
// With keys (qk_norm_rotary_write_kv): out holds the n_q_heads query heads only; the key heads
// go to keys and the heads - n_q_heads value heads that follow them in the input (stride_g on)
// to values, [batch, heads - n_q_heads, S, dim] at cache strides (b, h, s), at slots[l].
struct QkNormRotaryArgs {
  const void* qk = nullptr;
  FloatType dtype = FloatType::kFloat32;
  int64_t stride_b = 0, stride_l = 0, stride_g = 0;
  const void* q_weight = nullptr;
  const void* k_weight = nullptr;
  const void* cos = nullptr;
  const void* sin = nullptr;
  void* out = nullptr;
  int64_t batch = 0, length = 0, heads = 0, n_q_heads = 0, dim = 0, rotary = 0;
  float eps = 0.f;
  void* keys = nullptr;
  void* values = nullptr;
  int64_t cache_stride_b = 0, cache_stride_h = 0, cache_stride_s = 0;
  const int64_t* slots = nullptr;
  int64_t n_slots = 0;
};
void launch_qk_norm_rotary(const QkNormRotaryArgs& args, cudaStream_t stream);
// gate_up [rows, 2 * inter] contiguous -> out [rows, inter] contiguous, of `dtype`.
void launch_swiglu(const void* gate_up, void* out, FloatType dtype, int64_t rows, int64_t inter,
                   cudaStream_t stream);

}  // namespace dmax

namespace dmax {

// ---- moe_route (csrc/cuda/moe_route.cu) ----
// logits [rows, experts] float32 contiguous, bias [experts] -> ids [rows, top_k] int64, weights
// [rows, top_k] float32, contiguous.
void launch_moe_route(const float* logits, const float* bias, int64_t* ids, float* weights,
                      int64_t rows, int64_t experts, int64_t n_group, int64_t topk_group,
                      int64_t top_k, float scaling, cudaStream_t stream);

}  // namespace dmax

namespace dmax {

// ---- moe_dispatch / moe_combine (csrc/cuda/moe_dispatch.cu) ----
// ids [entries] int64 (entries = tokens * k) -> rows [entries], inverse [entries] int64, offsets
// [experts] int32. Throws past the kernel's sizes (kernels/moe_dispatch.cuh kMaxDispatch*).
void launch_moe_dispatch(const int64_t* ids, int64_t entries, int64_t k, int64_t experts,
                         int64_t* rows, int64_t* inverse, int32_t* offsets, cudaStream_t stream);
// sorted_out [entries, hidden] of `dtype`, inverse [tokens * k], weights [tokens, k] float32,
// addend and residual [tokens, hidden] of `dtype` or nullptr -> out [tokens, hidden] of `dtype`;
// all contiguous.
void launch_moe_combine(const void* sorted_out, FloatType dtype, const int64_t* inverse,
                        const float* weights, const void* addend, const void* residual, void* out,
                        int64_t tokens, int64_t k, int64_t hidden, cudaStream_t stream);

}  // namespace dmax

namespace dmax {

// ---- step_tables (csrc/cuda/step_tables.cu) ----
// positions [batch, length] int64, inv_freq [half] float32, valid_from [batch] int64, write_slot
// [1] int64 -> fed [length] int64, cos / sin [batch, length, 2 half] of `dtype`, mask [batch, 1,
// length, span] bool; all contiguous.
struct StepTablesArgs {
  const int64_t* positions = nullptr;
  const float* inv_freq = nullptr;
  const int64_t* valid_from = nullptr;
  const int64_t* write_slot = nullptr;
  int64_t* fed = nullptr;
  void* cos = nullptr;
  void* sin = nullptr;
  bool* mask = nullptr;
  FloatType dtype = FloatType::kFloat32;
  int64_t batch = 0, length = 0, half = 0, span = 0, block_length = 0;
};
void launch_step_tables(const StepTablesArgs& args, cudaStream_t stream);

// ---- block_attention (csrc/cuda/block_attention.cu) ----
// q [B, heads, T, D], keys / values [B, kv_heads, S, D] of `dtype` (D contiguous, other strides
// as given: b, head, t or s), mask bool [B or 1, 1, T, S] (strides b (0: shared), t, s)
// -> out [B, T, heads * D] contiguous of `dtype`. D <= 128 (throws past it).
struct BlockAttentionArgs {
  const void* q;
  const void* keys;
  const void* values;
  const bool* mask;
  void* out;
  int64_t batch, heads, kv_heads, length, slots, dim;
  int64_t q_strides[3], k_strides[3], v_strides[3], mask_strides[3];
  float scale;
};
// The float32 workspace a launch on a device of `multiprocessors` needs (0: none, when the keys
// are not split).
int64_t block_attention_workspace_floats(const BlockAttentionArgs& args, FloatType dtype,
                                         int multiprocessors);
void launch_block_attention(const BlockAttentionArgs& args, FloatType dtype, int multiprocessors,
                            float* workspace, cudaStream_t stream);

}  // namespace dmax
