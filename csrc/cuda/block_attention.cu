// Launcher of the block_attention kernels (csrc/kernels/block_attention.cuh) over raw device
// pointers: picks the element type and the key splits, then one launch, or two with the
// splits' merge.
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/element_type.h"
#include "cuda/launchers.h"
#include "kernels/block_attention.cuh"

namespace dmax {
namespace {

kernels::AttnShape shape_of(const BlockAttentionArgs& a, int multiprocessors) {
  kernels::AttnShape sh{static_cast<int>(a.batch), static_cast<int>(a.heads),
                        static_cast<int>(a.kv_heads), static_cast<int>(a.length),
                        static_cast<int>(a.slots), static_cast<int>(a.dim), 1, 0};
  kernels::choose_block_attention_splits(sh, multiprocessors);
  return sh;
}

template <class T>
void attention_typed(const BlockAttentionArgs& a, const kernels::AttnShape& sh,
                     float* workspace, cudaStream_t stream) {
  const kernels::AttnStrides st{a.q_strides[0], a.q_strides[1], a.q_strides[2],
                                a.k_strides[0], a.k_strides[1], a.k_strides[2],
                                a.v_strides[0], a.v_strides[1], a.v_strides[2],
                                a.mask_strides[0], a.mask_strides[1], a.mask_strides[2]};
  float* sums = workspace;
  float* ml = sh.splits > 1
                  ? workspace + static_cast<int64_t>(sh.batch) * sh.heads * sh.length *
                                    sh.splits * sh.dim
                  : nullptr;
  const LaunchConfig cfg = kernels::block_attention_launch_config(sh);
  const auto attention_kernel = &kernels::block_attention_kernel<T>;
  DMAX_LAUNCH(attention_kernel, cfg.grid, cfg.block, cfg.smem_bytes, stream)(
      static_cast<const T*>(a.q), static_cast<const T*>(a.keys), static_cast<const T*>(a.values),
      a.mask, st, sh, a.scale, static_cast<T*>(a.out), sums, ml);
  if (sh.splits == 1) return;
  const LaunchConfig merge = kernels::block_attention_combine_launch_config(sh);
  const auto combine_kernel = &kernels::block_attention_combine_kernel<T>;
  DMAX_LAUNCH(combine_kernel, merge.grid, merge.block, merge.smem_bytes, stream)(
      sums, ml, sh, static_cast<T*>(a.out));
}

}  // namespace

int64_t block_attention_workspace_floats(const BlockAttentionArgs& args, int multiprocessors) {
  const kernels::AttnShape sh = shape_of(args, multiprocessors);
  if (sh.splits == 1) return 0;
  return static_cast<int64_t>(sh.batch) * sh.heads * sh.length * sh.splits * (sh.dim + 2);
}

void launch_block_attention(const BlockAttentionArgs& args, FloatType dtype, int multiprocessors,
                            float* workspace, cudaStream_t stream) {
  if (args.dim > kernels::kAttnMaxHeadDim)
    throw std::runtime_error("block_attention: the kernel takes head dims up to " +
                             std::to_string(kernels::kAttnMaxHeadDim) + ", got " +
                             std::to_string(args.dim));
  if (args.batch == 0 || args.heads == 0 || args.length == 0) return;
  const kernels::AttnShape sh = shape_of(args, multiprocessors);
  with_element_type(dtype, [&](auto t) {
    attention_typed<decltype(t)>(args, sh, workspace, stream);
  });
  DMAX_CHECK_LAUNCH("block_attention");
}

}  // namespace dmax
