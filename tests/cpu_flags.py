"""What this CPU offers the native kernels' forms (csrc/cpu/vec/cpu_features.h), for tests that
run each form where it can run and skip it elsewhere."""
import pathlib

import pytest
import torch


def cpu_flags() -> set[str]:
    """The kernel's flags from /proc/cpuinfo (empty where unknown)."""
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


FLAGS = cpu_flags()
# The bf16 dot-product forms (DMAX_CPU_BF16_DOT) run: torch runs the AVX512 copies of the
# kernels and the CPU has AVX512-BF16.
HAS_BF16_DOT = "avx512_bf16" in FLAGS and torch.backends.cpu.get_cpu_capability() == "AVX512"
needs_bf16_dot = pytest.mark.skipif(
    not HAS_BF16_DOT, reason="the bf16 dot-product forms need a CPU with AVX512-BF16 and torch "
                             "running its AVX512 capability")
