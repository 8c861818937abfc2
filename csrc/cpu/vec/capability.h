// Which compiled copy of a csrc/cpu/vec kernel to run (cmake/cpu_capability.cmake compiles each
// once per CPU capability, in namespace dmax::cpu::<capability>): the capability torch itself
// runs with (honours ATEN_CPU_CAPABILITY), among the copies that exist.
//   static const auto kernel = DMAX_CPU_KERNEL(my_rows_kernel);
#pragma once
#include <ATen/Context.h>

#include <string>

namespace dmax::cpu {

template <class Fn>
Fn pick_cpu_kernel(Fn avx512, Fn avx2, Fn fallback) {
  const std::string cap = at::get_cpu_capability();
  if (avx512 != nullptr && cap == "AVX512") return avx512;
  if (avx2 != nullptr && (cap == "AVX512" || cap == "AVX2")) return avx2;
  return fallback;
}

}  // namespace dmax::cpu

#ifdef DMAX_CPU_CAPABILITY_AVX512
#define DMAX_CPU_KERNEL_AVX512_(fn) &::dmax::cpu::AVX512::fn
#else
#define DMAX_CPU_KERNEL_AVX512_(fn) nullptr
#endif
#ifdef DMAX_CPU_CAPABILITY_AVX2
#define DMAX_CPU_KERNEL_AVX2_(fn) &::dmax::cpu::AVX2::fn
#else
#define DMAX_CPU_KERNEL_AVX2_(fn) nullptr
#endif
#define DMAX_CPU_KERNEL(fn)                                                           \
  ::dmax::cpu::pick_cpu_kernel<decltype(&::dmax::cpu::DEFAULT::fn)>(                  \
      DMAX_CPU_KERNEL_AVX512_(fn), DMAX_CPU_KERNEL_AVX2_(fn), &::dmax::cpu::DEFAULT::fn)
