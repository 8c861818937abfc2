// Loading n (<= one vector) elements of float / Half / BFloat16 as a float32 vector (zero-filled
// past n), storing one back, rounding one to the element type, and storing two rounded ones as
// one store: shared by the per-capability CPU kernels (each copy compiles these in its
// CPU_CAPABILITY namespace; the vector width is the capability's).
#pragma once
#include <ATen/cpu/vec/vec.h>
#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include <cstdint>
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

#if defined(CPU_CAPABILITY_AVX512)
// 16-bit lane indices of vpermt2w: the high halves of a's 16 words, then of b's.
alignas(64) inline constexpr uint16_t kHighHalvesOfTwo[32] = {
    1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31,
    33, 35, 37, 39, 41, 43, 45, 47, 49, 51, 53, 55, 57, 59, 61, 63};
#endif

// Stores a then b, 2 x kWidth float32 values that are values of T already (round_to<T>), as T at
// p. bf16 on AVX512: the high halves of both gathered by one vpermt2w, one 512-bit store (a
// narrowing store, vpmovdw to memory, is slow on the Zen 5 of docs/PERFORMANCE.md, and
// store_from_float would round again).
template <class T>
inline void store_rounded_pair(const at::vec::Vectorized<float>& a,
                               const at::vec::Vectorized<float>& b, T* p) {
  constexpr int64_t kWidth = at::vec::Vectorized<float>::size();
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m512i both = _mm512_permutex2var_epi16(
        _mm512_castps_si512(static_cast<__m512>(a)), _mm512_load_si512(kHighHalvesOfTwo),
        _mm512_castps_si512(static_cast<__m512>(b)));
    _mm512_storeu_si512(p, both);
    return;
  }
#endif
  store_from_float(a, p, kWidth);
  store_from_float(b, p + kWidth, kWidth);
}

}  // namespace dmax::cpu::CPU_CAPABILITY
