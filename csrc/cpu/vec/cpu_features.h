// Which x86 instruction-set extensions this CPU has, beyond the capability copy that runs
// (capability.h), and whether the 16-bit GEMM kernels use AVX512-BF16 dot products.
//
// vdpbf16ps does 32 bf16 multiply-adds per instruction against 16 for a float32 FMA. Where a
// core has one 512-bit FMA pipe (AMD Zen 4/5) that doubles the throughput of the compute-bound
// block GEMMs; on Intel cores with AMX (two FMA ports; oneDNN runs AMX tiles) it measured no
// faster than the float32-FMA kernels (docs/PERFORMANCE.md, 2026-11-25 21:22), so "auto" leaves
// those machines on their previous paths.
//
// For the op entry points (csrc/cpu/<op>.cpp); the kernels' dot forms are compiled with
// bf16_dot_target.h. DMAX_CPU_BF16_DOT=auto (default) | on | off, read at every call (tests
// switch it): "on" on a CPU without AVX512-BF16 is an error, not a silent fallback.
#pragma once
#include <ATen/Context.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

namespace dmax::cpu {

struct CpuFeatures {
  bool avx512_bf16 = false;
  bool amx_bf16 = false;
  bool amd = false;  // vendor "AuthenticAMD"
};

inline CpuFeatures detect_cpu_features() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(_M_X64)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid(0, &a, &b, &c, &d))  // the vendor string: EBX, EDX, ECX
    f.amd = b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u;
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    f.amx_bf16 = (d >> 22) & 1u;  // CPUID.(7,0):EDX[22]
    const bool avx512f = (b >> 16) & 1u;
    unsigned a1 = 0, b1 = 0, c1 = 0, d1 = 0;
    if (avx512f && a >= 1 && __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1))
      f.avx512_bf16 = (a1 >> 5) & 1u;  // CPUID.(7,1):EAX[5]
  }
#endif
  return f;
}

inline const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect_cpu_features();
  return features;
}

// Whether the bf16 kernels run AVX512-BF16 dot products now (see the top of this file): the
// switch allows it and the AVX512 capability copy runs (the dot forms live in that copy only).
// The switch is checked first, so a bad value is an error whichever copy runs.
inline bool use_bf16_dot() {
  const char* env = std::getenv("DMAX_CPU_BF16_DOT");
  const bool has = cpu_features().avx512_bf16;
  bool wanted;
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) {
    wanted = has && !cpu_features().amx_bf16;
  } else if (std::strcmp(env, "off") == 0) {
    wanted = false;
  } else {
    TORCH_CHECK(std::strcmp(env, "on") == 0,
                "DMAX_CPU_BF16_DOT must be auto, on or off, got '", env, "'");
    TORCH_CHECK(has, "DMAX_CPU_BF16_DOT=on, but this CPU has no AVX512-BF16");
    wanted = true;
  }
  return wanted && at::get_cpu_capability() == "AVX512";
}

// Whether the weight-streaming kernels (skinny_linear, moe_experts) prefetch with prefetchnta
// (prefetch.h): DMAX_CPU_PREFETCH=auto (default: on AMD CPUs, where it measured faster) | nta |
// t1, read at every call (tests run both). The hint changes no result.
inline bool use_nta_prefetch() {
  const char* env = std::getenv("DMAX_CPU_PREFETCH");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return cpu_features().amd;
  TORCH_CHECK(std::strcmp(env, "nta") == 0 || std::strcmp(env, "t1") == 0,
              "DMAX_CPU_PREFETCH must be auto, nta or t1, got '", env, "'");
  return std::strcmp(env, "nta") == 0;
}

}  // namespace dmax::cpu
