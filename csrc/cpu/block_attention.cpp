// dmax.block_attention on the CPU: a decoding block's attention over the KV cache, the model's
// SDPA call (model/attention.py) as one op whose output is already in the layout the output
// projection reads. Masks become additive biases once per call; the (sequence, key-value head)
// pairs run in parallel, each through csrc/cpu/vec/block_attention_kernel.cpp.
// Semantics: dmax_ext.reference.block_attention_reference; the CUDA version:
// csrc/kernels/block_attention.cuh.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <memory>

#include "common/layer_op_checks.h"
#include "cpu/dispatch_float.h"
#include "cpu/vec/block_attention_kernel.h"
#include "cpu/vec/capability.h"
#include "cpu/vec/cpu_features.h"
#include "ops_cpu.h"

namespace dmax::cpu {
namespace {

void check_cpu_tensors(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                       const at::Tensor& mask) {
  for (const auto* t : {&q, &keys, &values, &mask}) {
    TORCH_CHECK(t->device().is_cpu(), "block_attention: the CPU kernel got a ", t->device(),
                " tensor");
  }
}

// One row of the bias: 0 where the mask is true, -inf where false, branch-free on the bits
// (0 = +0.0f, 0xFF800000 = -inf). The restrict pointers let the compiler vectorize it: the
// per-element branch cost ~10 us a call at 32 x 320, a tenth of the op, and the scalar form
// without them ~4 us (2026-12-06), which the other threads waited on.
void bias_row(const uint8_t* __restrict mask, uint32_t* __restrict bias, int64_t S) {
  for (int64_t s = 0; s < S; ++s)
    bias[s] = (static_cast<uint32_t>(mask[s] != 0) - 1u) & 0xFF800000u;
}

// bias[b, t, s] = 0 where mask[b, 0, t, s], else -inf; -inf for the padding slots s >= S.
at::Tensor mask_bias(const at::Tensor& mask, int64_t Sp) {
  const int64_t Bm = mask.size(0), T = mask.size(2), S = mask.size(3);
  at::Tensor bias = at::empty({Bm, T, Sp}, mask.options().dtype(at::kFloat));
  const at::Tensor m = mask.contiguous();
  const auto* m_p = reinterpret_cast<const uint8_t*>(m.const_data_ptr<bool>());
  auto* bits = reinterpret_cast<uint32_t*>(bias.mutable_data_ptr<float>());
  for (int64_t r = 0; r < Bm * T; ++r) {
    uint32_t* b_row = bits + r * Sp;
    bias_row(m_p + r * S, b_row, S);
    for (int64_t s = S; s < Sp; ++s) b_row[s] = 0xFF800000u;
  }
  return bias;
}

template <class T>
at::Tensor block_attention_typed(const at::Tensor& q, const at::Tensor& keys,
                                 const at::Tensor& values, const at::Tensor& mask,
                                 double scale) {
  static const auto head_kernel = DMAX_CPU_KERNEL(block_attention_head<T>);
  const int64_t B = q.size(0), H = q.size(1), T_rows = q.size(2), D = q.size(3);
  const int64_t KV = keys.size(1), S = keys.size(2), group = H / KV, Sp = round_up_16(S);
  at::Tensor out = at::empty({B, T_rows, H * D}, q.options());
  if (out.numel() == 0) return out;
  const at::Tensor bias = mask_bias(mask, Sp);
  const T* q_p = q.const_data_ptr<T>();
  const T* k_p = keys.const_data_ptr<T>();
  const T* v_p = values.const_data_ptr<T>();
  const float* bias_p = bias.const_data_ptr<float>();
  T* out_p = out.mutable_data_ptr<T>();
  const int64_t scratch = block_attention_scratch_floats(group * T_rows, S, D);
  const bool bf16_dot = block_attention_dot_shape<T>(D) && use_bf16_dot();
  at::parallel_for(0, B * KV, 1, [&](int64_t begin, int64_t end) {
    // Not zero-filled: the kernel writes every slot it reads (~200 KB per head at 320 slots).
    std::unique_ptr<float[]> work(new float[scratch]);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / KV, g = i % KV;
      head_kernel(AttentionHead<T>{
          q_p + b * q.stride(0) + g * group * q.stride(1), q.stride(1), q.stride(2),
          k_p + b * keys.stride(0) + g * keys.stride(1), keys.stride(2),
          v_p + b * values.stride(0) + g * values.stride(1), values.stride(2),
          bias_p + (mask.size(0) == 1 ? 0 : b) * T_rows * Sp, group, T_rows, S, D,
          static_cast<float>(scale), work.get(), out_p + b * T_rows * H * D + g * group * D,
          H * D, bf16_dot});
    }
  });
  return out;
}

}  // namespace

at::Tensor block_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                           const at::Tensor& mask, double scale) {
  checks::check_block_attention_args(q, keys, values, mask);
  check_cpu_tensors(q, keys, values, mask);
  return dispatch_float(q.scalar_type(), [&](auto t) {
    return block_attention_typed<decltype(t)>(q, keys, values, mask, scale);
  });
}

}  // namespace dmax::cpu
