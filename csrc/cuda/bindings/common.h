// Shared by the per-op binding headers: the stream to launch on and the device guard, which
// differ between the real CUDA build and the simt emulation build.
#pragma once
#include <ATen/ATen.h>

#include "cuda/launchers.h"

namespace dmax::gpu {
// The launchers' element type of a tensor the checks admitted (float32, float16, bfloat16).
inline FloatType float_type_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return FloatType::kFloat32;
    case at::kHalf: return FloatType::kFloat16;
    default: return FloatType::kBFloat16;
  }
}
}  // namespace dmax::gpu

#ifdef DMAX_SIMT
#include "kernels/device.h"
namespace dmax::gpu {
inline cudaStream_t current_stream(const at::Tensor&) { return nullptr; }
// The emulated kernels run on CPU tensors.
inline void check_kernel_device(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "dmax_simt: ", name, " must be a CPU tensor, got ", t.device());
}
struct DeviceGuard { explicit DeviceGuard(const at::Tensor&) {} };
// The emulation's stand-in for a device's multiprocessor count, which kernels that size their
// grid to the device read (block_attention's key splits): small, so that the tests' modest
// shapes take the split path as well as the unsplit one.
inline int multiprocessor_count(const at::Tensor&) { return 4; }
}  // namespace dmax::gpu
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
namespace dmax::gpu {
inline cudaStream_t current_stream(const at::Tensor& t) {
  return at::cuda::getCurrentCUDAStream(t.device().index()).stream();
}
inline void check_kernel_device(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "dmax: ", name, " must be a CUDA tensor, got ", t.device());
}
struct DeviceGuard {
  explicit DeviceGuard(const at::Tensor& t) : guard(t.device()) {}
  c10::cuda::CUDAGuard guard;
};
inline int multiprocessor_count(const at::Tensor& t) {
  return at::cuda::getDeviceProperties(t.device().index())->multiProcessorCount;
}
}  // namespace dmax::gpu
#endif
