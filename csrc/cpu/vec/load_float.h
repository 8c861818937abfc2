// Loading n (<= one vector) elements of float / Half / BFloat16 as a float32 vector (zero-filled
// past n), storing one back, and rounding one to the element type: shared by the per-capability
// CPU kernels (each copy compiles these in its CPU_CAPABILITY namespace; the vector width is the
// capability's).
#pragma once
#include <ATen/cpu/vec/vec.h>
#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

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

// Stores the first n (<= one vector) lanes of v as T, rounded to nearest even like Tensor.to().
template <class T>
inline void store_from_float(const at::vec::Vectorized<float>& v, T* p, int64_t n) {
  constexpr int64_t kWidth = at::vec::Vectorized<float>::size();
  if constexpr (std::is_same_v<T, float>) {
    v.store(p, n);
  } else if (n == kWidth) {
    at::vec::convert_from_float<T>(v, v).store(p, n);
  } else {
    float tail[kWidth];
    v.store(tail);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(tail[i]);
  }
}

// v rounded to T and back (round to nearest even, like Tensor.to()); float: v itself.
template <class T>
inline at::vec::Vectorized<float> round_to(const at::vec::Vectorized<float>& v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
#if defined(CPU_CAPABILITY_AVX512)
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // In registers (a store and reload took half of a bf16 RMSNorm): c10::BFloat16's rounding,
    // bits + 0x7FFF + (bit 16), the low half cleared; NaN stays a quiet NaN.
    const __m512 x = v;
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
    r = _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q),
                              _mm512_set1_epi32(0x7FC00000));
    return _mm512_castsi512_ps(r);
#endif
  } else {
    constexpr int64_t kWidth = at::vec::Vectorized<float>::size();
    T tmp[kWidth];
    at::vec::convert_from_float<T>(v, v).store(tmp, kWidth);
    return load_float(tmp, kWidth);
  }
}

}  // namespace dmax::cpu::CPU_CAPABILITY
