// Launcher of the logits_stats kernel (csrc/kernels/logits_stats.cuh) over raw device pointers:
// dispatch over the logits' element type and the top-K list size (1, or 8 for k = 2..8).
#include "cuda/element_type.h"
#include "cuda/launchers.h"
#include "kernels/logits_stats.cuh"

namespace dmax {
namespace {

template <typename T, int K>
void launch_typed(const void* logits, int64_t batch, int64_t length, int64_t vocab, int k,
                  double temperature, const int64_t* seeds, int64_t* pred, float* conf,
                  int64_t* topk_ids, float* topk_probs, cudaStream_t stream) {
  const LaunchConfig cfg =
      kernels::logits_stats_launch_config(batch * length, vocab, static_cast<int>(sizeof(T)));
  // A named pointer: the template arguments' comma would split the macro's arguments.
  auto* logits_stats_kernel = &kernels::logits_stats_kernel<T, K>;
  DMAX_LAUNCH(logits_stats_kernel, cfg.grid, cfg.block, cfg.smem_bytes, stream)(
      static_cast<const T*>(logits), static_cast<int>(length), static_cast<int>(vocab), k,
      kernels::RowSampling{temperature, kernels::gumbel_noise_max(),
                           temperature > 0.0 ? static_cast<float>(1.0 / temperature) : 0.f},
      seeds, pred, conf, topk_ids, topk_probs);
  DMAX_CHECK_LAUNCH("logits_stats");
}

template <typename T>
void launch_k(const void* logits, int64_t batch, int64_t length, int64_t vocab, int k,
              double temperature, const int64_t* seeds, int64_t* pred, float* conf,
              int64_t* topk_ids, float* topk_probs, cudaStream_t stream) {
  if (k == 1)
    launch_typed<T, 1>(logits, batch, length, vocab, k, temperature, seeds, pred, conf, topk_ids,
                       topk_probs, stream);
  else
    launch_typed<T, 8>(logits, batch, length, vocab, k, temperature, seeds, pred, conf, topk_ids,
                       topk_probs, stream);
}

}  // namespace

void launch_logits_stats(const void* logits, FloatType dtype, int64_t batch, int64_t length,
                         int64_t vocab, int k, double temperature, const int64_t* seeds,
                         int64_t* pred, float* conf, int64_t* topk_ids, float* topk_probs,
                         cudaStream_t stream) {
  if (batch == 0 || length == 0) return;
  with_element_type(dtype, [&](auto t) {
    launch_k<decltype(t)>(logits, batch, length, vocab, k, temperature, seeds, pred, conf,
                          topk_ids, topk_probs, stream);
  });
}

}  // namespace dmax
