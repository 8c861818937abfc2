// Launcher of the hybrid_embed kernel (csrc/kernels/hybrid_embed.cuh) over raw device pointers:
// picks the element type and the vector width (16-byte accesses when every row start allows).
#include <cstdint>

#include "cuda/element_type.h"
#include "cuda/launchers.h"
#include "kernels/hybrid_embed.cuh"

namespace dmax {
namespace {

bool aligned16(const void* p, int64_t stride_elems, size_t elem_bytes) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && (stride_elems * elem_bytes) % 16 == 0;
}

template <class T, int VEC>
void launch_typed(const HybridEmbedArgs& a, cudaStream_t stream) {
  const LaunchConfig cfg = kernels::hybrid_embed_launch_config(a.batch, a.length, a.hidden, VEC);
  const auto hybrid_embed_kernel = &kernels::hybrid_embed_kernel<T, VEC>;
  DMAX_LAUNCH(hybrid_embed_kernel, cfg.grid, cfg.block, cfg.smem_bytes, stream)(
      static_cast<T*>(a.embeds), a.embeds_stride_b, a.embeds_stride_l,
      static_cast<const T*>(a.weight), a.weight_stride, a.vocab, a.ids, a.active, a.changed,
      a.topk_ids, a.topk_probs, static_cast<int>(a.length), static_cast<int>(a.hidden),
      static_cast<int>(a.k), a.mask_id);
}

template <class T>
void launch_vectorized(const HybridEmbedArgs& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vectorizable = a.hidden % kVec == 0 &&
                            aligned16(a.embeds, a.embeds_stride_b, sizeof(T)) &&
                            aligned16(a.embeds, a.embeds_stride_l, sizeof(T)) &&
                            aligned16(a.weight, a.weight_stride, sizeof(T));
  if (vectorizable)
    launch_typed<T, kVec>(a, stream);
  else
    launch_typed<T, 1>(a, stream);
}

}  // namespace

void launch_hybrid_embed(const HybridEmbedArgs& args, cudaStream_t stream) {
  if (args.batch == 0 || args.length == 0 || args.hidden == 0) return;
  with_element_type(args.dtype,
                    [&](auto t) { launch_vectorized<decltype(t)>(args, stream); });
  DMAX_CHECK_LAUNCH("hybrid_embed");
}

}  // namespace dmax
