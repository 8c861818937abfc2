// Torch-facing side of the CUDA kernels: argument checks, then the raw-pointer launchers of
// csrc/cuda/launchers.h. Compiled twice from this one source:
//  - product build (DMAX_WITH_CUDA): binds torch.ops.dmax.* on the CUDA dispatch key;
//  - test build (DMAX_SIMT): declares torch.ops.dmax_simt.* with the same schemas on the CPU
//    dispatch key, the launchers running the unchanged kernels on the simt emulation.
#include <torch/library.h>

#include "cuda/bindings/block_attention.h"
#include "cuda/bindings/common.h"
#include "cuda/bindings/hybrid_embed.h"
#include "cuda/bindings/logits_stats.h"
#include "cuda/bindings/moe_dispatch.h"
#include "cuda/bindings/moe_route.h"
#include "cuda/bindings/norms.h"
#include "cuda/bindings/onpolicy_noise.h"
#include "cuda/bindings/promote.h"
#include "cuda/bindings/spd_update.h"
#include "cuda/bindings/step_tables.h"
#include "cuda/bindings/swiglu.h"
#include "schemas.h"

#define DMAX_BIND_KERNEL_OPS(m)                                           \
  m.impl("logits_stats", &dmax::gpu::logits_stats);                       \
  m.impl("promote", &dmax::gpu::promote);                                 \
  m.impl("spd_update", &dmax::gpu::spd_update);                           \
  m.impl("hybrid_embed", &dmax::gpu::hybrid_embed);                       \
  m.impl("onpolicy_noise", &dmax::gpu::onpolicy_noise);                   \
  m.impl("rms_norm", &dmax::gpu::rms_norm);                               \
  m.impl("add_rms_norm", &dmax::gpu::add_rms_norm);                       \
  m.impl("qk_norm_rotary", &dmax::gpu::qk_norm_rotary);                   \
  m.impl("qk_norm_rotary_write_kv", &dmax::gpu::qk_norm_rotary_write_kv); \
  m.impl("swiglu", &dmax::gpu::swiglu);                                   \
  m.impl("moe_route", &dmax::gpu::moe_route);                             \
  m.impl("moe_dispatch", &dmax::gpu::moe_dispatch);                       \
  m.impl("moe_combine", &dmax::gpu::moe_combine);                         \
  m.impl("step_tables", &dmax::gpu::step_tables);                         \
  m.impl("block_attention", &dmax::gpu::block_attention)

#ifdef DMAX_SIMT
#include "simt/simt.h"

namespace {
// Schedule of the emulated threads between barriers: 0 forward, 1 reverse, else random(seed).
void set_schedule_seed(int64_t seed) { simt::set_schedule_seed(static_cast<uint64_t>(seed)); }
}  // namespace

TORCH_LIBRARY(dmax_simt, m) {
  dmax::define_dmax_schemas(m);
  m.def("set_schedule_seed(int seed) -> ()", &set_schedule_seed);
}
TORCH_LIBRARY_IMPL(dmax_simt, CPU, m) { DMAX_BIND_KERNEL_OPS(m); }
#else
TORCH_LIBRARY_IMPL(dmax, CUDA, m) { DMAX_BIND_KERNEL_OPS(m); }
#endif
