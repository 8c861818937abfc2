// Software prefetch of the next weight panel or tile, a few cache lines per multiply-add step, so
// the memory stream overlaps the arithmetic (prefetching a panel at once stalls on the fill
// buffers): shared by the weight-streaming CPU kernels (moe_experts, skinny_linear). In the
// capability's namespace, like load_float.h: an inline function compiled with different
// instruction sets must not be merged across the copies.
#pragma once
#include <cstdint>

namespace dmax::cpu::CPU_CAPABILITY {

// A tile that is not inlined steps a local copy and hands it back at its end
// (`Pf pf = prefetch; ... prefetch = pf;`): through the reference, GCC loaded and stored the
// cursor at every multiply-add step (llada2-small's experts, weights in L3: 1-row experts 6.5 ->
// 5.3 us, 32-row ones 29.4 -> 27.9 us).
template <int kLocality>
struct BasicPrefetcher {
  const char* next;
  const char* end;
  int64_t lines_per_step;

  inline void step() {
    for (int64_t q = 0; q < lines_per_step && next < end; ++q, next += 64)
      __builtin_prefetch(next, 0, kLocality);
  }
};

// Into L2 (prefetcht1), not L1: the panel or tile being computed on stays in L1 (llada2-small's
// experts: 2.8 -> 2.4 ms per layer with cold weights, float32, on the Xeon of the earlier
// entries). The kernels are instantiated for both hints, the op entry points choose
// (cpu_features.h's use_nta_prefetch()); a hint read at run time inside the tile loops cost
// the float32 forward more than prefetchnta gained.
using Prefetcher = BasicPrefetcher<2>;
// prefetchnta, on AMD CPUs: llada2-small's block forward 1-3% (bf16) and 3-5% (float32) faster,
// in 30-37 of 40 interleaved pairs a run, on the Zen 5 class EPYC of docs/PERFORMANCE.md
// (2026-12-06 08:52 UTC entry).
using NtaPrefetcher = BasicPrefetcher<0>;

// run.template operator()<Pf>() with the prefetcher the op entry point chose (`nta`): the
// kernels' one switch from the run-time choice to their compile-time hint.
template <class Run>
inline void with_prefetcher(bool nta, Run&& run) {
  if (nta) {
    run.template operator()<NtaPrefetcher>();
  } else {
    run.template operator()<Prefetcher>();
  }
}

}  // namespace dmax::cpu::CPU_CAPABILITY
