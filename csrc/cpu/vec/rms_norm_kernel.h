// The per-row kernel of dmax.rms_norm and dmax.qk_norm_rotary on the CPU. rms_norm_kernel.cpp is
// compiled once per CPU capability (cmake/cpu_capability.cmake); csrc/cpu/rms_norm.cpp picks one
// at run time (capability.h).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace dmax::cpu {

// One row, as dmax_ext.model.modules rounds it (float32 math, T where torch rounds to T):
//   y = T(weight * T(x * rsqrt(mean(x^2) + eps)))
// then, with a rotary (cos != nullptr), on the first R dims (rotate-half, apply_rotary):
//   out[i] = T(T(y[i] cos[i]) + T(rot[i] sin[i])),  rot = (-y[R/2:R], y[:R/2]);  out[R:] = y[R:].
template <class T>
struct NormRow {
  const T* x;            // [H], contiguous
  const T* weight;       // [H]
  const T* cos;          // [R] or nullptr
  const T* sin;          // [R]
  int64_t H, R;
  float eps;
  float* scratch;        // [H + R] float32 work space (with a rotary; rows may share one)
  T* out;                // [H]
};

#define DMAX_DECLARE_RMS_NORM_ROW(cap)                                           \
  namespace cap {                                                                \
  template <class T>                                                             \
  void rms_norm_rows(const NormRow<T>* rows, int64_t count);                     \
  extern template void rms_norm_rows<float>(const NormRow<float>*, int64_t);      \
  extern template void rms_norm_rows<c10::Half>(const NormRow<c10::Half>*, int64_t); \
  extern template void rms_norm_rows<c10::BFloat16>(const NormRow<c10::BFloat16>*, int64_t); \
  }
DMAX_DECLARE_RMS_NORM_ROW(DEFAULT)
DMAX_DECLARE_RMS_NORM_ROW(AVX2)
DMAX_DECLARE_RMS_NORM_ROW(AVX512)
#undef DMAX_DECLARE_RMS_NORM_ROW

}  // namespace dmax::cpu
