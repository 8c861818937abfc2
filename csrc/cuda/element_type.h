// The launchers' one switch over FloatType: fn(T{}) with T the kernels' element type (float,
// __half, __nv_bfloat16). For csrc/cuda/*.cu only (device.h gives the 16-bit types there, from
// CUDA's headers or the simt build's).
#pragma once
#include "cuda/launchers.h"
#include "kernels/device.h"

namespace dmax {

template <class Fn>
void with_element_type(FloatType dtype, Fn&& fn) {
  switch (dtype) {
    case FloatType::kFloat32: fn(float{}); break;
    case FloatType::kFloat16: fn(__half{}); break;
    case FloatType::kBFloat16: fn(__nv_bfloat16{}); break;
  }
}

}  // namespace dmax
