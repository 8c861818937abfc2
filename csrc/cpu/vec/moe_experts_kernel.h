// The per-expert kernel of dmax.moe_experts on the CPU. moe_experts_kernel.cpp is compiled once per
// CPU capability (cmake/cpu_capability.cmake); csrc/cpu/moe_experts.cpp picks one at run time
// (capability.h).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace dmax::cpu {

// One expert's SwiGLU FFN on the m rows routed to it, i < m:
//   [g | u] = r(x[rows[i]] @ gate_up),  h = r(r(silu(g)) * u),  y = r(h @ down)
// with r() rounding to T, as the torch formulation rounds (GEMM outputs, silu and the product in
// T); float32 accumulation. y goes to out_rows[i] in T (exact: it is rounded to T).
template <class T>
struct ExpertTask {
  const T* x;               // [N, H], row stride H
  const int64_t* rows;      // [m]: the token row of each routed slot
  T* const* out_rows;       // [m]: where y[i] goes ([H] each, in T: its values are T's)
  int64_t m, H, I;
  // [H, 2I] and [I, H] of this expert, row-major; or, when `packed`, the same packed for the
  // bf16 dot products: [2I / 32, H / 2, 32, 2] and [H / 32, I / 2, 32, 2], element
  // [j / 32, k / 2, j % 32, k % 2] holding row k, column j (docs/ARCHITECTURE.md, moe_experts).
  const T* gate_up;
  const T* down;
  const T* next_gate_up;    // the gate_up of the expert this thread runs next, or nullptr
  float* scratch;           // m * (2 H + 3 I) floats of work space
  // bf16 only, honoured by the AVX512 copy: the GEMMs in AVX512-BF16 dot products (the caller
  // decides once per op call from cpu_features.h's use_bf16_dot()).
  bool bf16_dot = false;
  bool packed = false;      // bf16 with bf16_dot only (the op entry point unpacks otherwise)
  // prefetchnta instead of prefetcht1 for the weight stream (cpu_features.h's use_nta_prefetch()).
  bool nta_prefetch = false;
};

// out[n] = T(sum_j weights[n, j] * y[n, j]) for n in [begin, end): each product rounded to float32,
// summed in slot order j = 0..k-1 (the torch formulation's float32 weighted sum, cast once).
template <class T>
struct CombineTask {
  const T* y;               // [N, k, H]: each routed slot's expert output
  const float* weights;     // [N, k]
  int64_t k, H;
  T* out;                   // [N, H]
};

// ops.pack_moe_weights' layout: the columns of a block (ExpertTask's packed gate_up / down).
constexpr int64_t kPackCols = 32;

#define DMAX_DECLARE_MOE_EXPERT_FFN(cap)                                               \
  namespace cap {                                                                      \
  /* out[e, j / 32, p, j % 32] = (w[e, 2p, j], w[e, 2p + 1, j]) as one uint32, low half      \
     first, for the pair rows r = e * K / 2 + p in [begin, end): w bf16 bits [E, K, N],       \
     K even, N % 32 == 0 */                                                            \
  void moe_pack_pairs(const uint16_t* w, int64_t K, int64_t N, uint32_t* out, int64_t begin, \
                      int64_t end);                                                    \
  template <class T>                                                                   \
  void moe_expert_ffn(const ExpertTask<T>& task);                                      \
  extern template void moe_expert_ffn<float>(const ExpertTask<float>&);                \
  extern template void moe_expert_ffn<c10::Half>(const ExpertTask<c10::Half>&);        \
  extern template void moe_expert_ffn<c10::BFloat16>(const ExpertTask<c10::BFloat16>&); \
  template <class T>                                                                   \
  void moe_combine_rows(const CombineTask<T>& task, int64_t begin, int64_t end);       \
  extern template void moe_combine_rows<float>(const CombineTask<float>&, int64_t, int64_t); \
  extern template void moe_combine_rows<c10::Half>(const CombineTask<c10::Half>&, int64_t, \
                                                   int64_t);                           \
  extern template void moe_combine_rows<c10::BFloat16>(const CombineTask<c10::BFloat16>&, \
                                                       int64_t, int64_t);              \
  }
DMAX_DECLARE_MOE_EXPERT_FFN(DEFAULT)
DMAX_DECLARE_MOE_EXPERT_FFN(AVX2)
DMAX_DECLARE_MOE_EXPERT_FFN(AVX512)
#undef DMAX_DECLARE_MOE_EXPERT_FFN

}  // namespace dmax::cpu
