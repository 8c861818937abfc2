// Launcher of the swiglu kernel (csrc/kernels/swiglu.cuh) over raw device pointers: picks the
// element type.
#include <cstdint>

#include "cuda/element_type.h"
#include "cuda/launchers.h"
#include "kernels/swiglu.cuh"

namespace dmax {
namespace {

template <class T>
void swiglu_typed(const void* gate_up, void* out, int64_t rows, int64_t inter,
                  cudaStream_t stream) {
  const LaunchConfig cfg = kernels::swiglu_launch_config(rows, inter);
  const auto swiglu_kernel = &kernels::swiglu_kernel<T>;
  DMAX_LAUNCH(swiglu_kernel, cfg.grid, cfg.block, cfg.smem_bytes, stream)(
      static_cast<const T*>(gate_up), static_cast<T*>(out), rows, inter);
}

}  // namespace

void launch_swiglu(const void* gate_up, void* out, FloatType dtype, int64_t rows, int64_t inter,
                   cudaStream_t stream) {
  if (rows == 0 || inter == 0) return;
  with_element_type(dtype, [&](auto t) {
    swiglu_typed<decltype(t)>(gate_up, out, rows, inter, stream);
  });
  DMAX_CHECK_LAUNCH("swiglu");
}

}  // namespace dmax
