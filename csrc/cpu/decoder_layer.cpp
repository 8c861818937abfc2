// dmax.decoder_layer on the CPU: one decoder layer of a decoding block's cached forward, every
// module on its CPU native form, as one op. It calls the same kernels, in the same order and on
// the same views, as model/llada2.py's DecoderLayer does module by module (rms_norm,
// skinny_linear, qk_norm_rotary, the cache write, block_attention, moe_route, moe_experts, the
// dense MLP's / shared expert's fused gate|up and swiglu), so its output is bitwise the module
// path's. What it removes is the interpreter between them: ~35 torch calls and ~13 module calls
// a layer, about a tenth of a bf16 block forward of llada2-small; and most residual adds, which
// skinny_linear makes as it stores a projection (the same roundings). model/native_layer.py
// decides when it applies (every module would take its native form) and packs the arguments.
// Semantics: DecoderLayer.forward with a KV cache (docs/ARCHITECTURE.md); no CUDA version (the
// CUDA step is a captured graph, which has no interpreter to remove).
#include <ATen/ATen.h>

#include "ops_cpu.h"

namespace dmax::cpu {
namespace {

// The weights' order in the op's `weights` list (model/native_layer.py packs them).
enum Weight : int64_t {
  kInputNorm, kQkv, kQueryNorm, kKeyNorm, kDense, kPostNorm,
  kMlp,  // dense MLP: gate_up, down; MoE: router, expert_bias, gate_up, down[, shared gate_up, down]
};
enum Dim : int64_t { kHeads, kKvHeads, kHeadDim, kGroups, kTopkGroups, kTopK, kDims };
enum Scalar : int64_t { kEps, kPostEps, kQkEps, kScale, kRoutedScaling, kScalars };

// Linear.forward's native form: x [..., K] as rows, the product viewed back to [..., N]; with
// `residual` ([..., N]), residual + the product, added by the kernel as it stores the product
// (bitwise torch's add: one aten::add and its tensor fewer, ~3 us each).
at::Tensor projection(const at::Tensor& x, const at::Tensor& weight,
                      const at::Tensor& residual = at::Tensor()) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = weight.size(0);
  const at::Tensor rows = x.reshape({-1, x.size(-1)});
  if (!residual.defined()) return skinny_linear(rows, weight).view(shape);
  return skinny_linear(rows, weight, residual.reshape({rows.size(0), -1})).view(shape);
}

// GatedMLP.forward on its native form: down(swiglu(x @ gate_up^T)), gate_up the gate and up
// weights stacked (+ residual, as projection's).
at::Tensor gated_mlp(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down,
                     const at::Tensor& residual = at::Tensor()) {
  return projection(swiglu(projection(x, gate_up)), down, residual);
}

}  // namespace

at::Tensor decoder_layer(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                         const at::Tensor& mask, const at::Tensor& keys, const at::Tensor& values,
                         int64_t write_slot, int64_t span, at::TensorList weights,
                         at::IntArrayRef dims, at::ArrayRef<double> scalars, int64_t out_rows) {
  TORCH_CHECK(x.dim() == 3, "decoder_layer: x must be [B, T, H], got ", x.sizes());
  TORCH_CHECK(dims.size() == kDims && scalars.size() == kScalars,
              "decoder_layer: dims must hold ", static_cast<int64_t>(kDims), " ints and scalars ",
              static_cast<int64_t>(kScalars), " floats, got ", dims.size(), " and ",
              scalars.size());
  const int64_t n_mlp = static_cast<int64_t>(weights.size()) - kMlp;
  TORCH_CHECK(n_mlp == 2 || n_mlp == 4 || n_mlp == 6,
              "decoder_layer: weights must be the attention's 6 and a dense MLP's 2 (gate_up, "
              "down) or a MoE block's 4 (+2 shared), got ", weights.size());
  const int64_t batch = x.size(0), length = x.size(1);
  const int64_t n_heads = dims[kHeads], n_kv = dims[kKvHeads], head_dim = dims[kHeadDim];
  TORCH_CHECK(write_slot >= 0 && write_slot + length <= span && span <= keys.size(2),
              "decoder_layer: the fed slots [", write_slot, ", ", write_slot + length,
              ") and the span ", span, " must lie in the cache's ", keys.size(2), " slots");
  TORCH_CHECK(out_rows == -1 || (out_rows >= 1 && out_rows <= length),
              "decoder_layer: out_rows must be -1 (every fed token) or in [1, ", length,
              "] (the last fed tokens), got ", out_rows);
  // Every fed token's keys and values; the attention and MLP for the last n_out tokens only.
  const int64_t n_out = out_rows < 0 ? length : out_rows, first = length - n_out;

  // Attention (Attention.forward with a cache, native forms).
  const at::Tensor qkv = projection(rms_norm(x, weights[kInputNorm], scalars[kEps]), weights[kQkv])
                             .view({batch, length, -1, head_dim});
  const int64_t n_qk = n_heads + n_kv;
  const at::Tensor qk = qk_norm_rotary(qkv.narrow(2, 0, n_qk), weights[kQueryNorm],
                                       weights[kKeyNorm], cos, sin, n_heads, scalars[kQkEps]);
  keys.narrow(2, write_slot, length).copy_(qk.narrow(1, n_heads, n_kv));
  values.narrow(2, write_slot, length).copy_(qkv.narrow(2, n_qk, n_kv).transpose(1, 2));
  const at::Tensor attended =
      block_attention(qk.narrow(1, 0, n_heads).narrow(2, first, n_out), keys.narrow(2, 0, span),
                      values.narrow(2, 0, span), mask.narrow(2, first, n_out), scalars[kScale]);
  // x + dense(attended), on the last n_out tokens
  const at::Tensor h = projection(attended, weights[kDense], x.narrow(1, first, n_out));

  // The MLP on the post-attention norm.
  const at::Tensor normed = rms_norm(h, weights[kPostNorm], scalars[kPostEps]);
  const at::Tensor* w = weights.data() + kMlp;
  if (n_mlp == 2) return gated_mlp(normed, w[0], w[1], h);  // h + mlp(normed)
  // MoeBlock.forward: the router in float32 (Router.forward), the routed experts, the shared one.
  const at::Tensor flat = normed.reshape({-1, normed.size(-1)});
  const at::Tensor logits = skinny_linear(flat.to(at::kFloat), w[0].to(at::kFloat));
  const auto [ids, route_weights] = moe_route(logits, w[1].to(at::kFloat), dims[kGroups],
                                              dims[kTopkGroups], dims[kTopK],
                                              scalars[kRoutedScaling]);
  at::Tensor out = moe_experts(flat, ids, route_weights, w[2], w[3]).view_as(normed);
  if (n_mlp == 6) out = gated_mlp(normed, w[4], w[5], out);  // routed + shared(normed)
  return h + out;
}

}  // namespace dmax::cpu
