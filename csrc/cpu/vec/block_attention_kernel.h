// The kernel of dmax.block_attention on the CPU: one (sequence, key-value head) pair at a time.
// block_attention_kernel.cpp is compiled once per CPU capability (cmake/cpu_capability.cmake);
// csrc/cpu/block_attention.cpp picks one at run time (capability.h).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace dmax::cpu {

// The queries of one key-value head (its `group` query heads x T rows) against its S keys:
//   out[t, h, :] = T( sum_s p[h, t, s] v[s, :] ),  p = softmax_s(scale * q[h, t] . k[s]) over
//   the slots with mask[t, s] (float32 throughout; a row that sees no slot gets zeros).
template <class T>
struct AttentionHead {
  const T* q;             // q[h, t, :] at q + h * q_head_stride + t * q_row_stride
  int64_t q_head_stride, q_row_stride;
  const T* k;             // k[s, :] at k + s * k_row_stride
  int64_t k_row_stride;
  const T* v;             // v[s, :] at v + s * v_row_stride
  int64_t v_row_stride;
  const float* bias;      // [T_rows, Sp]: 0 where query t may attend slot s, -inf elsewhere
                          // (padding slots S <= s < Sp included), Sp = S rounded up to 16
  int64_t group, T_rows, S, D;
  float scale;
  float* scratch;         // block_attention_scratch_floats(group * T_rows, S, D) floats
  T* out;                 // out[t, h, :] at out + t * out_row_stride + h * D
  int64_t out_row_stride;
  // bf16 with D a multiple of 32 on the AVX512 copy: q . k and p . v as AVX512-BF16 dot
  // products (cpu_features.h), p rounded to bf16 for p . v as SDPA's bf16 CPU kernel does.
  bool bf16_dot = false;
};

// Whether an AttentionHead<T> of head width D may take the bf16_dot path.
template <class T>
constexpr bool block_attention_dot_shape(int64_t D) {
  return std::is_same_v<T, c10::BFloat16> && D % 32 == 0;
}

inline int64_t round_up_16(int64_t n) { return (n + 15) / 16 * 16; }

// Work space one AttentionHead call needs, in floats (the caller allocates it per thread):
// k transposed [D, Sp], v [S, Dp], the scaled queries [rows, D], 4 rows of scores [4, Sp]
// (the bf16_dot path uses less: pairs of bf16 in 32-bit slots).
inline int64_t block_attention_scratch_floats(int64_t rows, int64_t S, int64_t D) {
  const int64_t Sp = round_up_16(S), Dp = round_up_16(D);
  const int64_t float_path = D * Sp + S * Dp + rows * D + 4 * Sp;
  const int64_t dot_path = D / 2 * Sp + Sp / 2 * D + 4 * Sp + 4 * Sp / 2;  // kp, vp, scores, pp
  return float_path > dot_path ? float_path : dot_path;
}

#define DMAX_DECLARE_BLOCK_ATTENTION(cap)                                                  \
  namespace cap {                                                                          \
  template <class T>                                                                       \
  void block_attention_head(const AttentionHead<T>& head);                                 \
  extern template void block_attention_head<float>(const AttentionHead<float>&);           \
  extern template void block_attention_head<c10::Half>(const AttentionHead<c10::Half>&);   \
  extern template void block_attention_head<c10::BFloat16>(                                \
      const AttentionHead<c10::BFloat16>&);                                                \
  }
DMAX_DECLARE_BLOCK_ATTENTION(DEFAULT)
DMAX_DECLARE_BLOCK_ATTENTION(AVX2)
DMAX_DECLARE_BLOCK_ATTENTION(AVX512)
#undef DMAX_DECLARE_BLOCK_ATTENTION

}  // namespace dmax::cpu
