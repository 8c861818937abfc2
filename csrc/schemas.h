// The schema of every dmax op, written once. registration.cpp declares them in namespace `dmax`;
// the test-only simt build declares the same strings in namespace `dmax_simt`.
// Semantics: docs/ARCHITECTURE.md ("Ops") and python/dmax_ext/reference.py.
#pragma once

namespace dmax {

constexpr const char* kLogitsStatsSchema =
    "logits_stats(Tensor logits, int k, float temperature, Tensor? seeds) -> "
    "(Tensor pred, Tensor conf, Tensor topk_ids, Tensor topk_probs)";
constexpr const char* kPromoteSchema =
    "promote(Tensor ids, Tensor conf, Tensor pred, float threshold, int mask_id, bool prefix) -> Tensor";
constexpr const char* kSpdUpdateSchema =
    "spd_update(Tensor ids, Tensor active, Tensor promoted, Tensor pred, Tensor conf, "
    "float accept_threshold, int mask_id) -> (Tensor new_ids, Tensor changed, Tensor converged)";
constexpr const char* kHybridEmbedSchema =
    "hybrid_embed(Tensor(a!) embeds, Tensor weight, Tensor ids, Tensor active, Tensor changed, "
    "Tensor topk_ids, Tensor topk_probs, int mask_id) -> ()";
constexpr const char* kOnpolicyNoiseSchema =
    "onpolicy_noise(Tensor noisy_ids, Tensor sample_flags, Tensor topk_ids, Tensor topk_probs, "
    "float temperature, Tensor? seeds, int mask_id) -> Tensor";
// The model's RMSNorm, and the attention's q|k head norms + partial rotary, as one op each
// (without gradients).
constexpr const char* kRmsNormSchema = "rms_norm(Tensor x, Tensor weight, float eps) -> Tensor";
// A residual add and the RMSNorm after it: (x + update, rms_norm(x + update)).
constexpr const char* kAddRmsNormSchema =
    "add_rms_norm(Tensor x, Tensor update, Tensor weight, float eps) -> "
    "(Tensor sum, Tensor normed)";
constexpr const char* kQkNormRotarySchema =
    "qk_norm_rotary(Tensor qk, Tensor q_weight, Tensor k_weight, Tensor cos, Tensor sin, "
    "int n_q_heads, float eps) -> Tensor";
// qk_norm_rotary over a qkv projection's query and key heads, the key heads and the value heads
// after them written into the KV cache at `slots` (a cached forward's cache writes, no
// index_put_ of their own); returns the query heads.
constexpr const char* kQkNormRotaryWriteKvSchema =
    "qk_norm_rotary_write_kv(Tensor qkv, Tensor q_weight, Tensor k_weight, Tensor cos, "
    "Tensor sin, int n_q_heads, float eps, Tensor(a!) keys, Tensor(b!) values, Tensor slots) "
    "-> Tensor";
// silu(gate) * up over rows [gate | up] (the model's gated MLPs without gradients, after their
// gate and up projections made as one).
constexpr const char* kSwigluSchema = "swiglu(Tensor gate_up) -> Tensor";
// A MoE layer's router after its GEMM (the model's Router without gradients).
constexpr const char* kMoeRouteSchema =
    "moe_route(Tensor logits, Tensor expert_bias, int n_group, int topk_group, int top_k, "
    "float scaling) -> (Tensor ids, Tensor weights)";
// What a cached forward derives from its positions and slots before the layers: the fed slots,
// the rotary's cos / sin (in `dtype`) and the block-causal mask over the key span.
constexpr const char* kStepTablesSchema =
    "step_tables(Tensor position_ids, Tensor inv_freq, Tensor valid_from, Tensor write_slot, "
    "int span, int block_length, ScalarType dtype) -> "
    "(Tensor fed, Tensor cos, Tensor sin, Tensor mask)";
// The permutation around a MoE layer's grouped GEMMs: the routed entries sorted by expert, and
// the weighted sum of the experts' rows back per token (plus the shared expert's output, then
// the layer's residual).
constexpr const char* kMoeDispatchSchema =
    "moe_dispatch(Tensor ids, int n_experts) -> (Tensor rows, Tensor inverse, Tensor offsets)";
constexpr const char* kMoeCombineSchema =
    "moe_combine(Tensor sorted_out, Tensor inverse, Tensor weights, Tensor? addend=None, "
    "Tensor? residual=None) -> Tensor";

// CPU only (the routed experts of a MoE layer for a decoding block; on CUDA the model runs
// torch._grouped_mm), so it is not part of the CUDA kernels' simt twin: defined in `dmax` alone.
// gate_up / down: [E, H, 2I] / [E, I, H], or both packed for the bf16 dot products
// (ops.pack_moe_weights).
constexpr const char* kMoeExpertsSchema =
    "moe_experts(Tensor x, Tensor expert_ids, Tensor expert_weights, Tensor gate_up, "
    "Tensor down) -> Tensor";
// CPU only: whether moe_experts (and skinny_linear) run bf16 GEMMs in AVX512-BF16 dot products
// now (the CPU and DMAX_CPU_BF16_DOT, cpu_features.h), for which the model packs its experts'
// weights (ops.pack_moe_weights). `dmax`.
constexpr const char* kCpuBf16DotSchema = "cpu_bf16_dot() -> bool";
// CPU only: moe_experts' gate_up / down laid out for its bf16 dot products (ops.pack_moe_weights;
// reference: dmax_ext.reference.pack_moe_weights_reference). `dmax`.
constexpr const char* kPackMoeWeightsSchema = "pack_moe_weights(Tensor w) -> Tensor";
// CPU only: one SPD step of a running batch after its forward, in place on the block's state
// (logits_stats, promote, spd_update and hybrid_embed as decoding/step.py runs them, converged
// rows kept, step + 1; on CUDA the step runs those ops one by one). `dmax`.
constexpr const char* kSpdStepSchema =
    "spd_step(Tensor logits, Tensor(a!) ids, Tensor(b!) embeds, Tensor(c!) done, "
    "Tensor(d!) step, Tensor active, Tensor weight, Tensor? seeds, int k, float temperature, "
    "float threshold, float accept_threshold, int mask_id) -> ()";
// CPU only: the hard-threshold baseline's step, in place (logits_stats, promote anywhere, the
// promoted ids committed, converged when no mask is left; as decoding/step.py runs them). `dmax`.
constexpr const char* kThresholdStepSchema =
    "threshold_step(Tensor logits, Tensor(a!) ids, Tensor(b!) done, Tensor(c!) step, "
    "Tensor active, Tensor? seeds, int k, float temperature, float threshold, int mask_id) -> ()";
// A decoding block's attention over the KV cache (the model's SDPA call), the output
// [B, T, heads * D] as the output projection reads it.
constexpr const char* kBlockAttentionSchema =
    "block_attention(Tensor q, Tensor keys, Tensor values, Tensor mask, float scale) -> Tensor";
// CPU only: x @ weight^T (+ residual, [M, N]: a residual stream's add, rounded after the
// product as torch rounds them) for a decoding block's few rows (the model's projections and
// lm_head without gradients; elsewhere the model runs F.linear). Defined in `dmax` alone.
constexpr const char* kSkinnyLinearSchema =
    "skinny_linear(Tensor x, Tensor weight, Tensor? residual=None) -> Tensor";
// CPU only: one decoder layer of a decoding block's cached forward with every module on its
// native form (the ops above, in the modules' order): the layer's output for the last out_rows
// fed tokens (-1: all); keys / values get every fed token's entries at
// [write_slot, write_slot + T). `dmax`.
constexpr const char* kDecoderLayerSchema =
    "decoder_layer(Tensor x, Tensor cos, Tensor sin, Tensor mask, Tensor(a!) keys, "
    "Tensor(b!) values, int write_slot, int span, Tensor[] weights, int[] dims, "
    "float[] scalars, int out_rows=-1) -> Tensor";

// Applies `def` to every schema, so the two namespaces can never drift apart.
template <typename Library>
void define_dmax_schemas(Library& m) {
  m.def(kLogitsStatsSchema);
  m.def(kPromoteSchema);
  m.def(kSpdUpdateSchema);
  m.def(kHybridEmbedSchema);
  m.def(kOnpolicyNoiseSchema);
  m.def(kRmsNormSchema);
  m.def(kAddRmsNormSchema);
  m.def(kQkNormRotarySchema);
  m.def(kQkNormRotaryWriteKvSchema);
  m.def(kSwigluSchema);
  m.def(kMoeRouteSchema);
  m.def(kMoeDispatchSchema);
  m.def(kMoeCombineSchema);
  m.def(kStepTablesSchema);
  m.def(kBlockAttentionSchema);
}

}  // namespace dmax
