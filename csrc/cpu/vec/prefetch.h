// Software prefetch of the next weight panel or tile, a few cache lines per multiply-add step, so
// the memory stream overlaps the arithmetic (prefetching a panel at once stalls on the fill
// buffers): shared by the weight-streaming CPU kernels (moe_experts, skinny_linear). In the
// capability's namespace, like load_float.h: an inline function compiled with different
// instruction sets must not be merged across the copies.
#pragma once
#include <cstdint>

namespace dmax::cpu::CPU_CAPABILITY {

struct Prefetcher {
  const char* next;
  const char* end;
  int64_t lines_per_step;

  // Into L2 (prefetcht1), not L1: the panel or tile being computed on stays in L1 (llada2-small's
  // experts: 2.8 -> 2.4 ms per layer with cold weights, float32).
  inline void step() {
    for (int64_t q = 0; q < lines_per_step && next < end; ++q, next += 64)
      __builtin_prefetch(next, 0, 2);
  }
};

}  // namespace dmax::cpu::CPU_CAPABILITY
