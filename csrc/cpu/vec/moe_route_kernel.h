// The per-row kernel of dmax.moe_route on the CPU. moe_route_kernel.cpp is compiled once per CPU
// capability (cmake/cpu_capability.cmake); csrc/cpu/moe_route.cpp picks one at run time
// (capability.h).
#pragma once
#include <cstdint>

namespace dmax::cpu {

// The router of one token from its logits (SPEC section 1; dmax_ext.model.moe.Router):
// s = sigmoid(logits) as torch's vectorized sigmoid computes it, biased = s + bias; groups of
// E / n_group experts score the sum of their two best biased scores; the topk_group best groups
// stay; the top_k best biased scores among their experts give ids (descending, ties: lower
// index first); weights = s[ids] / (sum + 1e-20) (when top_k > 1) * scaling.
struct RouteTask {
  const float* logits;   // [N, E]
  const float* bias;     // [E]
  int64_t E, n_group, topk_group, top_k;
  float scaling;
  int64_t* ids;          // [N, top_k]
  float* weights;        // [N, top_k]
};

#define DMAX_DECLARE_MOE_ROUTE(cap)                                                 \
  namespace cap {                                                                   \
  void moe_route_rows(const RouteTask& task, int64_t begin, int64_t end);           \
  }
DMAX_DECLARE_MOE_ROUTE(DEFAULT)
DMAX_DECLARE_MOE_ROUTE(AVX2)
DMAX_DECLARE_MOE_ROUTE(AVX512)
#undef DMAX_DECLARE_MOE_ROUTE

}  // namespace dmax::cpu
