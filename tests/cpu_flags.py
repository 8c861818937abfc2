"""What this CPU offers the native kernels' forms (csrc/cpu/vec/cpu_features.h), for tests that
run each form where it can run and skip it elsewhere; and running a script on another of the
capability copies the CPU kernels are compiled in (cmake/cpu_capability.cmake)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dmax_ext.model.native import cpu_flags

FLAGS = cpu_flags()
# The bf16 dot-product forms (DMAX_CPU_BF16_DOT) run: torch runs the AVX512 copies of the
# kernels and the CPU has AVX512-BF16.
HAS_BF16_DOT = "avx512_bf16" in FLAGS and torch.backends.cpu.get_cpu_capability() == "AVX512"
# ... and the kernels take that form by default (DMAX_CPU_BF16_DOT=auto: not where AMX is, whose
# bf16 products are oneDNN's).
BF16_DOT_BY_DEFAULT = HAS_BF16_DOT and "amx_bf16" not in FLAGS
needs_bf16_dot = pytest.mark.skipif(
    not HAS_BF16_DOT, reason="the bf16 dot-product forms need a CPU with AVX512-BF16 and torch "
                             "running its AVX512 capability")


# The copies the CPU kernels are compiled in besides this CPU's own (AVX512 here): every test of
# a kernel's vector code runs them too, through run_on_capability.
OTHER_CAPABILITIES = ("default", "avx2")


def run_on_capability(capability: str, script: str) -> None:
    """Runs `script` (after `import dmax_ext`, with the tests folder on sys.path) in a new process
    whose torch picks the `capability` copies (ATEN_CPU_CAPABILITY); fails on its error. The
    script's first printed word must be torch's capability, which this checks."""
    tests = str(Path(__file__).parent)
    code = f"import sys; sys.path.insert(0, {tests!r})\nimport dmax_ext\n{script}"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, ATEN_CPU_CAPABILITY=capability), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[0] == capability.upper()
