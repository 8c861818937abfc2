// nvcuda::wmma, the warp-level matrix multiply-accumulate API of CUDA's <mma.h>, on the host:
// the m16n16k16 shape with __half or __nv_bfloat16 inputs and float accumulators (what a kernel
// here uses; other shapes and types are compile errors, not silent guesses).
//
// CUDA leaves the distribution of a fragment's elements over the lanes unspecified, so a kernel
// may only load, store, fill and multiply fragments, and apply one operation to every element
// of x[]. To catch a kernel that assumes a layout anyway, this emulation scatters the 256
// elements of a tile over the lanes in an order no GPU uses (element i of lane l is tile entry
// ((32 i + l) * 37) mod 256, row-major). A new fragment holds poison (NaN), as an uninitialized
// register would hold garbage.
//
// Strictness, like CUDA's requirements (each is a simt::Error):
// - load / store pointers 256-bit (32-byte) aligned; ldm a multiple of 16 bytes;
// - mma_sync is a collective of the whole warp: every lane calls it at the same site (checked
//   by the rendezvous, as for __syncwarp). load / store / fill are per lane and do NOT
//   synchronize: a lane that reads shared memory another lane wrote still needs the kernel's own
//   __syncwarp / __syncthreads, and the schedules expose a missing one. Not caught: a kernel
//   that relies on an mma_sync between one lane's read and another lane's later write of the
//   same shared memory (the emulation's rendezvous orders them as a __syncwarp would).
// Arithmetic: products of the 16-bit inputs are exact in float; each output sums its 16 products
// into the accumulator in k order with fused multiply-adds (tensor cores use another order: a
// kernel's tolerance must not depend on it).
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "error.h"
#include "warp.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
class fragment {
  static_assert(M == 16 && N == 16 && K == 16, "simt wmma: only the m16n16k16 shape is emulated");
  static_assert(std::is_same<Use, accumulator>::value
                    ? std::is_same<T, float>::value && std::is_void<Layout>::value
                    : (std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value) &&
                          (std::is_same<Layout, row_major>::value ||
                           std::is_same<Layout, col_major>::value),
                "simt wmma: matrix_a / matrix_b of __half or __nv_bfloat16 with a row_major or "
                "col_major layout, accumulator of float without one");

 public:
  static constexpr int num_elements = 8;  // 256 entries over 32 lanes
  T x[num_elements];
  fragment() {
    for (T& v : x) {
      if constexpr (std::is_same<T, float>::value) v = std::numeric_limits<float>::quiet_NaN();
      else v = ::simt::detail::from_bits<T>(0x7FFFu);  // NaN as __half and as __nv_bfloat16
    }
  }
};

namespace detail {

inline unsigned linear_thread() {
  return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}

// The tile entry (row-major index in [0, 256)) that element i of this lane holds.
inline int entry(int i) {
  return static_cast<int>(((32u * static_cast<unsigned>(i) + (linear_thread() & 31u)) * 37u) &
                          255u);
}

inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
inline void check_pointer(const char* op, const T* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    throw ::simt::Error(std::string("wmma::") + op + ": the pointer is not 256-bit aligned");
  if ((static_cast<size_t>(ldm) * sizeof(T)) % 16 != 0)
    throw ::simt::Error(std::string("wmma::") + op + ": ldm " + std::to_string(ldm) +
                        " is not a multiple of 16 bytes");
}

// Element (row, col) of a row- or column-major matrix with leading dimension ldm.
inline size_t offset(int row, int col, unsigned ldm, bool row_major_memory) {
  return row_major_memory ? static_cast<size_t>(row) * ldm + col
                          : static_cast<size_t>(col) * ldm + row;
}

}  // namespace detail

template <class Use, class T, class Layout>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, const T& value) {
  for (T& v : f.x) v = value;
}

// matrix_a (M x K) and matrix_b (K x N), their memory layout the fragment's.
template <class Use, class T, class Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value,
                "an accumulator's load_matrix_sync takes a layout_t");
  detail::check_pointer("load_matrix_sync", p, ldm);
  for (int i = 0; i < f.num_elements; ++i) {
    const int e = detail::entry(i);
    f.x[i] = p[detail::offset(e >> 4, e & 15, ldm, std::is_same<Layout, row_major>::value)];
  }
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p,
                             unsigned ldm, layout_t layout) {
  detail::check_pointer("load_matrix_sync", p, ldm);
  for (int i = 0; i < f.num_elements; ++i) {
    const int e = detail::entry(i);
    f.x[i] = p[detail::offset(e >> 4, e & 15, ldm, layout == mem_row_major)];
  }
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ldm, layout_t layout) {
  detail::check_pointer("store_matrix_sync", p, ldm);
  for (int i = 0; i < f.num_elements; ++i) {
    const int e = detail::entry(i);
    p[detail::offset(e >> 4, e & 15, ldm, layout == mem_row_major)] = f.x[i];
  }
}

// d = a b + c over the whole warp (d may be c). Each lane posts its elements to the warp's
// scratch, the lanes meet, each computes its own elements of d, and they meet again before the
// scratch can be reused.
template <class T, class LayoutA, class LayoutB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
                     const fragment<matrix_a, 16, 16, 16, T, LayoutA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LayoutB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  // Blocks run one at a time (simt::launch's mutex), so one scratch per warp of a block.
  static float scratch[32][3][256];
  float(&s)[3][256] = scratch[detail::linear_thread() / 32];
  for (int i = 0; i < 8; ++i) {
    const int e = detail::entry(i);
    s[0][e] = detail::to_float(a.x[i]);
    s[1][e] = detail::to_float(b.x[i]);
    s[2][e] = c.x[i];
  }
  __syncwarp();
  for (int i = 0; i < 8; ++i) {
    const int e = detail::entry(i), row = e >> 4, col = e & 15;
    float sum = s[2][e];
    for (int k = 0; k < 16; ++k) sum = std::fma(s[0][row * 16 + k], s[1][k * 16 + col], sum);
    d.x[i] = sum;
  }
  __syncwarp();
}

}  // namespace wmma
}  // namespace nvcuda
