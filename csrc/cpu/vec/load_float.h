// Loading n (<= one vector) elements of float / Half / BFloat16 as a float32 vector, zero-filled
// past n: shared by the per-capability CPU kernels (include inside their CPU_CAPABILITY namespace
// compile; the vector width is the capability's).
#pragma once
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

namespace dmax::cpu::CPU_CAPABILITY {

template <class T>
inline at::vec::Vectorized<float> load_float(const T* p, int64_t n) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t kWidth = Vec::size();
  if constexpr (std::is_same_v<T, float>) {
    return n == kWidth ? Vec::loadu(p) : Vec::loadu(p, n);
  } else {
    if (n == kWidth) {
      Vec v;
      at::vec::load_to_float(p, v);
      return v;
    }
    float tail[kWidth] = {};
    for (int64_t i = 0; i < n; ++i) tail[i] = static_cast<float>(p[i]);
    return Vec::loadu(tail);
  }
}

}  // namespace dmax::cpu::CPU_CAPABILITY
