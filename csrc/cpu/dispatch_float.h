// The CPU ops' dtype dispatch: fn(T{}) for the op's float dtype T (float32, bfloat16, float16;
// the caller has checked that it is one of them), returning fn's tensor.
#pragma once
#include <ATen/ATen.h>

namespace dmax::cpu {

template <class Fn>
at::Tensor dispatch_float(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      return fn(float{});
    case at::kBFloat16:
      return fn(c10::BFloat16{});
    default:
      return fn(c10::Half{});
  }
}

}  // namespace dmax::cpu
