// The soft-position kernel of dmax.hybrid_embed on the CPU. hybrid_embed_kernel.cpp is compiled
// once per CPU capability (cmake/cpu_capability.cmake); csrc/cpu/hybrid_embed.cpp picks one at run
// time (capability.h).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace dmax::cpu {

// One soft position: out = h * (target / (|h| + 1e-6)), h = sum_i probs[i] E[t_i] + p_mask m.
template <class T>
struct SoftRow {
  const T* weight;         // [V, H], row stride weight_stride
  int64_t weight_stride;
  const int64_t* topk_ids;  // [k], inside [0, V) (checked by the caller)
  const float* probs;       // [k]
  int64_t k, H;
  const float* mask_row;    // [H]: E[mask] in float32
  float mask_norm;          // |E[mask]|
  float* scratch;           // [H] float32 work space
  T* out;                   // [H]
};

#define DMAX_DECLARE_HYBRID_EMBED_SOFT_ROW(cap)                       \
  namespace cap {                                                     \
  template <class T>                                                  \
  void hybrid_embed_soft_row(const SoftRow<T>& row);                  \
  extern template void hybrid_embed_soft_row<float>(const SoftRow<float>&);           \
  extern template void hybrid_embed_soft_row<c10::Half>(const SoftRow<c10::Half>&);   \
  extern template void hybrid_embed_soft_row<c10::BFloat16>(const SoftRow<c10::BFloat16>&); \
  }
DMAX_DECLARE_HYBRID_EMBED_SOFT_ROW(DEFAULT)
DMAX_DECLARE_HYBRID_EMBED_SOFT_ROW(AVX2)
DMAX_DECLARE_HYBRID_EMBED_SOFT_ROW(AVX512)
#undef DMAX_DECLARE_HYBRID_EMBED_SOFT_ROW

}  // namespace dmax::cpu
