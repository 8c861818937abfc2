"""What this CPU offers the native kernels' forms (csrc/cpu/vec/cpu_features.h), for tests that
run each form where it can run and skip it elsewhere."""
import pytest
import torch

from dmax_ext.model.native import cpu_flags

FLAGS = cpu_flags()
# The bf16 dot-product forms (DMAX_CPU_BF16_DOT) run: torch runs the AVX512 copies of the
# kernels and the CPU has AVX512-BF16.
HAS_BF16_DOT = "avx512_bf16" in FLAGS and torch.backends.cpu.get_cpu_capability() == "AVX512"
needs_bf16_dot = pytest.mark.skipif(
    not HAS_BF16_DOT, reason="the bf16 dot-product forms need a CPU with AVX512-BF16 and torch "
                             "running its AVX512 capability")
