// The strict CPU emulation of the CUDA execution model: include this (through kernels/device.h)
// instead of the CUDA runtime, and unchanged kernel sources compile as host C++17.
// What is emulated and how strictly: README.md next to this file.
#pragma once

#if defined(__CUDACC__)
#error "simt/simt.h is the host emulation of CUDA; under nvcc include the CUDA runtime instead"
#endif

// Standard headers first: CUDA's host_defines.h defines keyword-like macros that must not leak
// into libstdc++ (the notes' __noinline__ pitfall).
#include <math.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// CUDA's host-safe headers: dim3/uint3, __half and __nv_bfloat16 with their host conversions.
#include <vector_types.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "block.h"
#include "error.h"
#include "fiber.h"
#include "intrinsics.h"
#include "launch.h"
#include "warp.h"
#include "wmma.h"

#if defined(SIMT_SANITIZE) && !defined(SIMT_ASAN)
#error "SIMT_SANITIZE is the AddressSanitizer build: compile with -fsanitize=address"
#endif

// Qualifiers. __noinline__ is left alone: redefining it breaks libstdc++.
#undef __global__
#undef __device__
#undef __host__
#undef __launch_bounds__
#undef __shared__
#define __device__
#define __host__
#define __launch_bounds__(...)
// Static __shared__ arrays become function-local statics: blocks run one at a time, so one
// instance per array is enough. Two mappings (csrc/simt/README.md):
#if defined(SIMT_SANITIZE)
// ASan build: plain statics in kernels of internal linkage. g++ gives ASan redzones only to
// statics that are not in a COMDAT group (inline functions, templates with external linkage)
// nor in a named section, so here kernels are `static` and overruns are ASan errors. No
// per-block poisoning in this build (the plain build has it).
#define __global__ static
#define __shared__ static
#else
// Plain build: all in one section, which simt::launch fills with 0xFF bytes before every block
// (an uninitialized shared read yields NaN / -1). __global__ is `inline` so a kernel header may
// be included by several translation units.
#define __global__ inline
#define __shared__ static __attribute__((section("simt_shared")))
#endif
// `extern __shared__` is not supported: use DMAX_DYNAMIC_SMEM.
