// The one place where torch.ops.dmax.* is declared and bound to its CPU implementations.
// CUDA implementations are bound in csrc/cuda/bindings.cpp (built only with DMAX_WITH_CUDA).
#include <torch/library.h>

#include "ops_cpu.h"
#include "schemas.h"

TORCH_LIBRARY(dmax, m) {
  dmax::define_dmax_schemas(m);
  m.def(dmax::kMoeExpertsSchema);
  m.def(dmax::kSkinnyLinearSchema);
  m.def(dmax::kDecoderLayerSchema);
  m.def(dmax::kCpuBf16DotSchema, &dmax::cpu::cpu_bf16_dot);  // no tensor: one kernel for all keys
  m.def(dmax::kPackMoeWeightsSchema);
  m.def(dmax::kSpdStepSchema);
  m.def(dmax::kThresholdStepSchema);
}

TORCH_LIBRARY_IMPL(dmax, CPU, m) {
  m.impl("logits_stats", &dmax::cpu::logits_stats);
  m.impl("promote", &dmax::cpu::promote);
  m.impl("spd_update", &dmax::cpu::spd_update);
  m.impl("hybrid_embed", &dmax::cpu::hybrid_embed);
  m.impl("spd_step", &dmax::cpu::spd_step);
  m.impl("threshold_step", &dmax::cpu::threshold_step);
  m.impl("onpolicy_noise", &dmax::cpu::onpolicy_noise);
  m.impl("moe_experts", &dmax::cpu::moe_experts);
  m.impl("skinny_linear", &dmax::cpu::skinny_linear);
  m.impl("moe_route", &dmax::cpu::moe_route);
  m.impl("rms_norm", &dmax::cpu::rms_norm);
  m.impl("add_rms_norm", &dmax::cpu::add_rms_norm);
  m.impl("qk_norm_rotary", &dmax::cpu::qk_norm_rotary);
  m.impl("qk_norm_rotary_write_kv", &dmax::cpu::qk_norm_rotary_write_kv);
  m.impl("swiglu", &dmax::cpu::swiglu);
  m.impl("moe_dispatch", &dmax::cpu::moe_dispatch);
  m.impl("moe_combine", &dmax::cpu::moe_combine);
  m.impl("step_tables", &dmax::cpu::step_tables);
  m.impl("block_attention", &dmax::cpu::block_attention);
  m.impl("decoder_layer", &dmax::cpu::decoder_layer);
  m.impl("pack_moe_weights", &dmax::cpu::pack_moe_weights);
}
