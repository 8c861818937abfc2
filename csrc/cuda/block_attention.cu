// Launcher of the block_attention kernels over raw device pointers: picks the kernel (16-bit
// inputs on head dims that are whole 16-wide tiles: tensor cores, block_attention_tc.cuh; else
// the CUDA-core kernel, block_attention.cuh), the element type and the key splits, then one
// launch, or two with the splits' merge.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda/element_type.h"
#include "cuda/launchers.h"
#include "kernels/block_attention.cuh"
#include "kernels/block_attention_tc.cuh"

namespace dmax {
namespace {

bool uses_tensor_cores(const BlockAttentionArgs& a, FloatType dtype) {
  return dtype != FloatType::kFloat32 && kernels::block_attention_tc_supports(a.dim);
}

kernels::AttnShape shape_of(const BlockAttentionArgs& a, FloatType dtype, int multiprocessors) {
  kernels::AttnShape sh{static_cast<int>(a.batch), static_cast<int>(a.heads),
                        static_cast<int>(a.kv_heads), static_cast<int>(a.length),
                        static_cast<int>(a.slots), static_cast<int>(a.dim), 1, 0};
  kernels::choose_block_attention_splits(
      sh, multiprocessors,
      uses_tensor_cores(a, dtype) ? kernels::block_attention_tc_row_blocks(sh)
                                  : kernels::block_attention_row_blocks(sh));
  return sh;
}

template <class T>
void attention_typed(const BlockAttentionArgs& a, const kernels::AttnShape& sh, bool tensor_cores,
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
  const T* q = static_cast<const T*>(a.q);
  const T* keys = static_cast<const T*>(a.keys);
  const T* values = static_cast<const T*>(a.values);
  T* out = static_cast<T*>(a.out);
  bool launched = false;
  if constexpr (!std::is_same<T, float>::value) {  // no float32 tensor-core kernel
    if (tensor_cores) {
      const LaunchConfig cfg = kernels::block_attention_tc_launch_config(sh);
      const auto attention_kernel =
          kernels::block_attention_tc_vector_rows(q, keys, values, st)
              ? &kernels::block_attention_tc_kernel<T, true>
              : &kernels::block_attention_tc_kernel<T, false>;
      DMAX_LAUNCH(attention_kernel, cfg.grid, cfg.block, cfg.smem_bytes, stream)(
          q, keys, values, a.mask, st, sh, a.scale, out, sums, ml);
      launched = true;
    }
  }
  if (!launched) {
    const LaunchConfig cfg = kernels::block_attention_launch_config(sh);
    const auto attention_kernel = &kernels::block_attention_kernel<T>;
    DMAX_LAUNCH(attention_kernel, cfg.grid, cfg.block, cfg.smem_bytes, stream)(
        q, keys, values, a.mask, st, sh, a.scale, out, sums, ml);
  }
  if (sh.splits == 1) return;
  const LaunchConfig merge = kernels::block_attention_combine_launch_config(sh);
  const auto combine_kernel = &kernels::block_attention_combine_kernel<T>;
  DMAX_LAUNCH(combine_kernel, merge.grid, merge.block, merge.smem_bytes, stream)(sums, ml, sh, out);
}

}  // namespace

int64_t block_attention_workspace_floats(const BlockAttentionArgs& args, FloatType dtype,
                                         int multiprocessors) {
  const kernels::AttnShape sh = shape_of(args, dtype, multiprocessors);
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
  const kernels::AttnShape sh = shape_of(args, dtype, multiprocessors);
  const bool tensor_cores = uses_tensor_cores(args, dtype);
  with_element_type(dtype, [&](auto t) {
    attention_typed<decltype(t)>(args, sh, tensor_cores, workspace, stream);
  });
  DMAX_CHECK_LAUNCH("block_attention");
}

}  // namespace dmax
