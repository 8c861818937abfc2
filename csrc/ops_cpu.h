// CPU implementations of the dmax ops (csrc/cpu/<op>.cpp). Signatures follow csrc/schemas.h.
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <tuple>

namespace dmax::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logits_stats(
    const at::Tensor& logits, int64_t k, double temperature, const std::optional<at::Tensor>& seeds);
at::Tensor promote(const at::Tensor& ids, const at::Tensor& conf, const at::Tensor& pred,
                   double threshold, int64_t mask_id, bool prefix);
std::tuple<at::Tensor, at::Tensor, at::Tensor> spd_update(
    const at::Tensor& ids, const at::Tensor& active, const at::Tensor& promoted,
    const at::Tensor& pred, const at::Tensor& conf, double accept_threshold, int64_t mask_id);
void hybrid_embed(const at::Tensor& embeds, const at::Tensor& weight, const at::Tensor& ids,
                  const at::Tensor& active, const at::Tensor& changed, const at::Tensor& topk_ids,
                  const at::Tensor& topk_probs, int64_t mask_id);
void spd_step(const at::Tensor& logits, const at::Tensor& ids, const at::Tensor& embeds,
              const at::Tensor& done, const at::Tensor& step, const at::Tensor& active,
              const at::Tensor& weight, const std::optional<at::Tensor>& seeds, int64_t k,
              double temperature, double threshold, double accept_threshold, int64_t mask_id);
void threshold_step(const at::Tensor& logits, const at::Tensor& ids, const at::Tensor& done,
                    const at::Tensor& step, const at::Tensor& active,
                    const std::optional<at::Tensor>& seeds, int64_t k, double temperature,
                    double threshold, int64_t mask_id);
at::Tensor onpolicy_noise(const at::Tensor& noisy_ids, const at::Tensor& sample_flags,
                          const at::Tensor& topk_ids, const at::Tensor& topk_probs,
                          double temperature, const std::optional<at::Tensor>& seeds,
                          int64_t mask_id);
at::Tensor moe_experts(const at::Tensor& x, const at::Tensor& expert_ids,
                       const at::Tensor& expert_weights, const at::Tensor& gate_up,
                       const at::Tensor& down);
bool cpu_bf16_dot();
at::Tensor pack_moe_weights(const at::Tensor& w);
at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& residual = std::nullopt);
std::tuple<at::Tensor, at::Tensor> moe_route(const at::Tensor& logits,
                                             const at::Tensor& expert_bias, int64_t n_group,
                                             int64_t topk_group, int64_t top_k, double scaling);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& update,
                                                const at::Tensor& weight, double eps);
at::Tensor qk_norm_rotary(const at::Tensor& qk, const at::Tensor& q_weight,
                          const at::Tensor& k_weight, const at::Tensor& cos, const at::Tensor& sin,
                          int64_t n_q_heads, double eps);
at::Tensor qk_norm_rotary_write_kv(const at::Tensor& qkv, const at::Tensor& q_weight,
                                   const at::Tensor& k_weight, const at::Tensor& cos,
                                   const at::Tensor& sin, int64_t n_q_heads, double eps,
                                   const at::Tensor& keys, const at::Tensor& values,
                                   const at::Tensor& slots);
at::Tensor swiglu(const at::Tensor& gate_up);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> step_tables(
    const at::Tensor& positions, const at::Tensor& inv_freq, const at::Tensor& valid_from,
    const at::Tensor& write_slot, int64_t span, int64_t block_length, at::ScalarType dtype);
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_dispatch(const at::Tensor& ids,
                                                            int64_t n_experts);
at::Tensor moe_combine(const at::Tensor& sorted_out, const at::Tensor& inverse,
                       const at::Tensor& weights, const std::optional<at::Tensor>& addend,
                       const std::optional<at::Tensor>& residual);
at::Tensor block_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                           const at::Tensor& mask, double scale);
at::Tensor decoder_layer(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                         const at::Tensor& mask, const at::Tensor& keys, const at::Tensor& values,
                         int64_t write_slot, int64_t span, at::TensorList weights,
                         at::IntArrayRef dims, at::ArrayRef<double> scalars, int64_t out_rows);

}  // namespace dmax::cpu
