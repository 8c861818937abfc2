// The functions of a kernel's AVX512 copy that use AVX512-BF16 instructions are compiled for them
// alone (the capability's global flags stay AVX512F/BW/VL/DQ, which CPUs without BF16 run); the
// op entry points call them only where cpu_features.h's use_bf16_dot() says so.
#pragma once

#define DMAX_BF16_DOT_TARGET __attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl")))
