// __syncthreads and the warp collectives, typed front ends over Block's rendezvous. Each takes
// its call site as defaulted trailing arguments, so the caller's file:line:column identifies the
// barrier / collective (inside a __device__ helper that is the helper's line: see README).
#pragma once

#include <cstring>
#include <limits>
#include <type_traits>

#include "block.h"

#if defined(__has_builtin)
#if __has_builtin(__builtin_COLUMN)
#define SIMT_COLUMN __builtin_COLUMN()
#endif
#endif
#ifndef SIMT_COLUMN
#define SIMT_COLUMN 0  // g++ 12 has no __builtin_COLUMN: two calls on one line share a site
#endif
#define SIMT_SITE_PARAMS                                                      \
  const char *simt_file = __builtin_FILE(), int simt_line = __builtin_LINE(), \
             int simt_column = SIMT_COLUMN
#define SIMT_SITE ::simt::detail::Site{simt_file, simt_line, simt_column}

namespace simt {
namespace detail {

template <class T>
inline uint64_t to_bits(const T& v) {
  // CUDA's __half2 / __nv_bfloat162 have user-written copies but are plain bits underneath.
  static_assert(std::is_standard_layout<T>::value && sizeof(T) <= 8,
                "warp collectives move plain values of at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, static_cast<const void*>(&v), sizeof(T));
  return bits;
}

template <class T>
inline T from_bits(uint64_t bits) {
  T v;
  std::memcpy(static_cast<void*>(&v), &bits, sizeof(T));
  return v;
}

// What a read of a lane outside the collective returns: NaN for floating types (0x7FFF is NaN
// both as __half and as __nv_bfloat16), 0xDEADBEEF... for everything else.
template <class T>
inline T poison_value() {
  if constexpr (std::is_floating_point<T>::value) return std::numeric_limits<T>::quiet_NaN();
  else if constexpr (sizeof(T) == 2) return from_bits<T>(0x7FFFu);
  else return from_bits<T>(0xDEADBEEFDEADBEEFull);
}

template <class T>
inline T shuffle(WarpOp op, unsigned mask, const T& v, int arg, int width, const Site& site) {
  bool poison = false;
  const uint64_t out = running_block(op_name(op)).warp_collective(op, mask, to_bits(v), arg, width,
                                                                   site, &poison);
  return poison ? poison_value<T>() : from_bits<T>(out);
}

inline uint64_t vote(WarpOp op, unsigned mask, int predicate, const Site& site) {
  bool poison = false;
  return running_block(op_name(op)).warp_collective(op, mask, predicate != 0, 0, 32, site, &poison);
}

}  // namespace detail
}  // namespace simt

inline void __syncthreads(SIMT_SITE_PARAMS) {
  ::simt::detail::running_block("__syncthreads").syncthreads(SIMT_SITE, 0);
}
inline int __syncthreads_count(int predicate, SIMT_SITE_PARAMS) {
  return static_cast<int>(
      ::simt::detail::running_block("__syncthreads_count").syncthreads(SIMT_SITE, predicate != 0));
}
inline int __syncthreads_and(int predicate, SIMT_SITE_PARAMS) {
  ::simt::detail::Block& b = ::simt::detail::running_block("__syncthreads_and");
  return b.syncthreads(SIMT_SITE, predicate != 0) == b.live_at_last_barrier();
}
inline int __syncthreads_or(int predicate, SIMT_SITE_PARAMS) {
  return ::simt::detail::running_block("__syncthreads_or").syncthreads(SIMT_SITE, predicate != 0) != 0;
}

inline void __syncwarp(unsigned mask = 0xffffffffu, SIMT_SITE_PARAMS) {
  ::simt::detail::vote(::simt::detail::WarpOp::Syncwarp, mask, 0, SIMT_SITE);
}

template <class T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize, SIMT_SITE_PARAMS) {
  return ::simt::detail::shuffle(::simt::detail::WarpOp::Shfl, mask, var, srcLane, width, SIMT_SITE);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                        SIMT_SITE_PARAMS) {
  return ::simt::detail::shuffle(::simt::detail::WarpOp::ShflUp, mask, var,
                                 static_cast<int>(delta > 64 ? 64 : delta), width, SIMT_SITE);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                          SIMT_SITE_PARAMS) {
  return ::simt::detail::shuffle(::simt::detail::WarpOp::ShflDown, mask, var,
                                 static_cast<int>(delta > 64 ? 64 : delta), width, SIMT_SITE);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize,
                         SIMT_SITE_PARAMS) {
  return ::simt::detail::shuffle(::simt::detail::WarpOp::ShflXor, mask, var, laneMask, width,
                                 SIMT_SITE);
}

inline unsigned __ballot_sync(unsigned mask, int predicate, SIMT_SITE_PARAMS) {
  return static_cast<unsigned>(
      ::simt::detail::vote(::simt::detail::WarpOp::Ballot, mask, predicate, SIMT_SITE));
}
inline int __any_sync(unsigned mask, int predicate, SIMT_SITE_PARAMS) {
  return static_cast<int>(::simt::detail::vote(::simt::detail::WarpOp::Any, mask, predicate, SIMT_SITE));
}
inline int __all_sync(unsigned mask, int predicate, SIMT_SITE_PARAMS) {
  return static_cast<int>(::simt::detail::vote(::simt::detail::WarpOp::All, mask, predicate, SIMT_SITE));
}
