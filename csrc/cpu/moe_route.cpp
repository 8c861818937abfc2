// dmax.moe_route on the CPU: a MoE layer's router after its GEMM (the group-limited top-k of
// SPEC section 1), for every token at once; each row runs csrc/cpu/vec/moe_route_kernel.cpp.
// Semantics: dmax_ext.model.moe.Router (the torch formulation, with gradients); the CUDA kernel:
// csrc/kernels/moe_route.cuh.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <tuple>

#include "common/layer_op_checks.h"
#include "cpu/vec/capability.h"
#include "cpu/vec/moe_route_kernel.h"
#include "ops_cpu.h"

namespace dmax::cpu {

std::tuple<at::Tensor, at::Tensor> moe_route(const at::Tensor& logits_in,
                                             const at::Tensor& bias_in, int64_t n_group,
                                             int64_t topk_group, int64_t top_k, double scaling) {
  checks::check_moe_route_args(logits_in, bias_in, n_group, topk_group, top_k);
  const int64_t N = logits_in.size(0), E = logits_in.size(1);
  static const auto route_rows = DMAX_CPU_KERNEL(moe_route_rows);
  const at::Tensor logits = logits_in.contiguous(), bias = bias_in.contiguous();
  at::Tensor ids = at::empty({N, top_k}, logits.options().dtype(at::kLong));
  at::Tensor weights = at::empty({N, top_k}, logits.options());
  const RouteTask task{logits.const_data_ptr<float>(), bias.const_data_ptr<float>(), E, n_group,
                       topk_group, top_k, static_cast<float>(scaling),
                       ids.mutable_data_ptr<int64_t>(), weights.mutable_data_ptr<float>()};
  // A row of E = 64 experts takes ~0.2 us: chunks of >= ~3 us (16 rows) keep handing a chunk to
  // another thread (~1-2 us) worth it; a block of 32 rows splits in two.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 10) / std::max<int64_t>(E, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) { route_rows(task, begin, end); });
  return {ids, weights};
}

}  // namespace dmax::cpu
