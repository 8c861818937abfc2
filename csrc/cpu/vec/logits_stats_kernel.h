// The row kernel of dmax.logits_stats on the CPU. logits_stats_kernel.cpp is compiled once per CPU
// capability (DEFAULT, AVX2, AVX512: see cmake/cpu_capability.cmake), each copy in its own
// namespace dmax::cpu::<capability>; csrc/cpu/logits_stats.cpp picks one at run time.
#pragma once
#include <cstdint>

namespace dmax::cpu {

enum class LogitsDtype { kFloat, kHalf, kBFloat16 };

struct LogitsStatsArgs {
  const void* logits;     // [rows, V] contiguous, rows = B * L
  LogitsDtype dtype;
  int64_t L, V;
  int k;                  // 1..8, <= V
  double temperature;     // 0: argmax; > 0: Gumbel-max with seeds
  const int64_t* seeds;   // [B], read only when temperature > 0
  int64_t* pred;          // [rows]
  float* conf;            // [rows]
  int64_t* topk_ids;      // [rows, k]
  float* topk_probs;      // [rows, k]
};

// Rows [begin, end). A row with a NaN or +inf logit, or only -inf logits, gets conf and topk_probs
// NaN (ids stay inside [0, V)): the Python wrapper turns that into an error.
#define DMAX_DECLARE_LOGITS_STATS_ROWS(cap) \
  namespace cap {                           \
  void logits_stats_rows(const LogitsStatsArgs& args, int64_t begin, int64_t end); \
  }
DMAX_DECLARE_LOGITS_STATS_ROWS(DEFAULT)
DMAX_DECLARE_LOGITS_STATS_ROWS(AVX2)
DMAX_DECLARE_LOGITS_STATS_ROWS(AVX512)
#undef DMAX_DECLARE_LOGITS_STATS_ROWS

}  // namespace dmax::cpu
