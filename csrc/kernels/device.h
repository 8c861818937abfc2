// The one switch between real CUDA and its CPU emulation. Kernel sources (kernels/*.cuh)
// include only this header and use the CUDA subset listed in docs/ARCHITECTURE.md.
//   DMAX_LAUNCH(kernel, grid, block, smem_bytes, stream)(args...);   launches a kernel
//   DMAX_DYNAMIC_SMEM(T, name);       declares T* name = the block's dynamic shared memory
// Under nvcc these are <<<...>>> and extern __shared__; otherwise csrc/simt/ emulates them.
#pragma once

#include <cstddef>

#if defined(__CUDACC__)

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>  // nvcuda::wmma (the emulation: simt/wmma.h)

#define DMAX_LAUNCH(k, grid, block, smem, stream) k<<<grid, block, smem, stream>>>
#define DMAX_DYNAMIC_SMEM(T, name)                                     \
  extern __shared__ __align__(128) unsigned char dmax_dynamic_smem_[]; \
  T* name = reinterpret_cast<T*>(dmax_dynamic_smem_)

#else

#include "../simt/simt.h"

#define DMAX_LAUNCH(k, grid, block, smem, stream) SIMT_LAUNCH(k, grid, block, smem, stream)
#define DMAX_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(::simt::detail::dynamic_smem())

#endif

// What a kernel's `<op>_launch_config(...)` host function returns.
struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t smem_bytes;
};
