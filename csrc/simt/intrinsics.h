// Device intrinsics on the host: atomics (CUDA's own overload set, returning the old value),
// bit tricks, float punning, fast-math functions at full precision, device min/max, __ldg.
#pragma once

#include <math.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

// ---- atomics: blocks run serially and fibers never preempt, so a plain read-modify-write is
// atomic here. A kernel that wrote `+=` instead of atomicAdd is NOT caught (see README).
#define SIMT_ATOMIC(name, T, expr)                 \
  inline T name(T* address, T val) {              \
    const T old = *address;                        \
    *address = (expr);                             \
    return old;                                    \
  }
#define SIMT_ATOMIC_INTEGER(T)                                                    \
  SIMT_ATOMIC(atomicAdd, T, static_cast<T>(old + val))                            \
  SIMT_ATOMIC(atomicExch, T, val)                                                 \
  SIMT_ATOMIC(atomicMin, T, val < old ? val : old)                                \
  SIMT_ATOMIC(atomicMax, T, val > old ? val : old)                                \
  SIMT_ATOMIC(atomicAnd, T, static_cast<T>(old & val))                            \
  SIMT_ATOMIC(atomicOr, T, static_cast<T>(old | val))                             \
  SIMT_ATOMIC(atomicXor, T, static_cast<T>(old ^ val))                            \
  inline T atomicCAS(T* address, T compare, T val) {                              \
    const T old = *address;                                                       \
    if (old == compare) *address = val;                                           \
    return old;                                                                   \
  }
// int arithmetic wraps on the GPU; do it in unsigned to avoid host UB.
inline int atomicAdd(int* address, int val) {
  const int old = *address;
  *address = static_cast<int>(static_cast<unsigned>(old) + static_cast<unsigned>(val));
  return old;
}
inline int atomicSub(int* address, int val) {
  const int old = *address;
  *address = static_cast<int>(static_cast<unsigned>(old) - static_cast<unsigned>(val));
  return old;
}
SIMT_ATOMIC(atomicExch, int, val)
SIMT_ATOMIC(atomicMin, int, val < old ? val : old)
SIMT_ATOMIC(atomicMax, int, val > old ? val : old)
SIMT_ATOMIC(atomicAnd, int, old & val)
SIMT_ATOMIC(atomicOr, int, old | val)
SIMT_ATOMIC(atomicXor, int, old ^ val)
inline int atomicCAS(int* address, int compare, int val) {
  const int old = *address;
  if (old == compare) *address = val;
  return old;
}
SIMT_ATOMIC_INTEGER(unsigned int)
SIMT_ATOMIC(atomicSub, unsigned int, old - val)
SIMT_ATOMIC_INTEGER(unsigned long long int)
SIMT_ATOMIC(atomicMin, long long int, val < old ? val : old)
SIMT_ATOMIC(atomicMax, long long int, val > old ? val : old)
SIMT_ATOMIC(atomicAdd, float, old + val)
SIMT_ATOMIC(atomicExch, float, val)
SIMT_ATOMIC(atomicAdd, double, old + val)
#undef SIMT_ATOMIC_INTEGER
#undef SIMT_ATOMIC

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <class T>
inline T __ldg(const T* p) {
  return *p;
}

// ---- bits
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) {
  return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x));
}
inline unsigned int __brev(unsigned int x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
  return __builtin_bswap32(x);
}

// ---- punning
namespace simt {
namespace detail {
template <class To, class From>
inline To pun(const From& v) {
  static_assert(sizeof(To) == sizeof(From), "pun between types of different sizes");
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}
}  // namespace detail
}  // namespace simt
inline unsigned int __float_as_uint(float x) { return simt::detail::pun<unsigned int>(x); }
inline int __float_as_int(float x) { return simt::detail::pun<int>(x); }
inline float __uint_as_float(unsigned int x) { return simt::detail::pun<float>(x); }
inline float __int_as_float(int x) { return simt::detail::pun<float>(x); }
inline long long __double_as_longlong(double x) { return simt::detail::pun<long long>(x); }
inline double __longlong_as_double(long long x) { return simt::detail::pun<double>(x); }

// ---- fast math, emulated at full precision (the GPU's results differ in the last bits; tests
// compare with tolerances, never bitwise against the GPU).
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanf(float x) { return std::tan(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __saturatef(float x) { return x != x ? 0.0f : (x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x)); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }

// ---- min/max as the device overloads them (same-type pairs; signed/unsigned mixes go unsigned,
// float/double mixes go double, like CUDA's math_functions.hpp).
#define SIMT_MINMAX(T)                                  \
  inline T min(T a, T b) { return b < a ? b : a; }      \
  inline T max(T a, T b) { return a < b ? b : a; }
SIMT_MINMAX(int)
SIMT_MINMAX(unsigned int)
SIMT_MINMAX(long)
SIMT_MINMAX(unsigned long)
SIMT_MINMAX(long long)
SIMT_MINMAX(unsigned long long)
#undef SIMT_MINMAX
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
inline double min(float a, double b) { return std::fmin(double(a), b); }
inline double max(float a, double b) { return std::fmax(double(a), b); }
inline double min(double a, float b) { return std::fmin(a, double(b)); }
inline double max(double a, float b) { return std::fmax(a, double(b)); }
inline unsigned int min(int a, unsigned int b) { return min(static_cast<unsigned>(a), b); }
inline unsigned int max(int a, unsigned int b) { return max(static_cast<unsigned>(a), b); }
inline unsigned int min(unsigned int a, int b) { return min(a, static_cast<unsigned>(b)); }
inline unsigned int max(unsigned int a, int b) { return max(a, static_cast<unsigned>(b)); }
inline unsigned long min(long a, unsigned long b) { return min(static_cast<unsigned long>(a), b); }
inline unsigned long max(long a, unsigned long b) { return max(static_cast<unsigned long>(a), b); }
inline unsigned long min(unsigned long a, long b) { return min(a, static_cast<unsigned long>(b)); }
inline unsigned long max(unsigned long a, long b) { return max(a, static_cast<unsigned long>(b)); }
inline unsigned long long min(long long a, unsigned long long b) {
  return min(static_cast<unsigned long long>(a), b);
}
inline unsigned long long max(long long a, unsigned long long b) {
  return max(static_cast<unsigned long long>(a), b);
}
inline unsigned long long min(unsigned long long a, long long b) {
  return min(a, static_cast<unsigned long long>(b));
}
inline unsigned long long max(unsigned long long a, long long b) {
  return max(a, static_cast<unsigned long long>(b));
}
