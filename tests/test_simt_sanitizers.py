"""Runs the emulated-CUDA kernel tests again against the AddressSanitizer + UBSan build.

An out-of-bounds global or shared-memory access, or undefined arithmetic, in a CUDA kernel then
aborts the child pytest and fails this test. The child process needs the ASan runtime preloaded
(torch and Python are not instrumented), and selects the emulated cases with `-k simt`.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dmax_ext._native as native

ROOT = Path(__file__).resolve().parents[1]
KERNEL_TESTS = ["test_logits_stats.py", "test_onpolicy_noise.py", "test_promote.py",
                "test_spd_update.py", "test_hybrid_embed.py", "test_layer_op_kernels.py",
                "test_block_attention_kernel.py"]


def _asan_runtime() -> str:
    # libstdc++ right after libasan: otherwise ASan's __cxa_throw interceptor finds no real
    # __cxa_throw (python itself does not link libstdc++) and the first C++ exception (a
    # TORCH_CHECK, or triton's import under opcheck) aborts with "CHECK failed: real___cxa_throw".
    libs = []
    for name in ("libasan.so", "libstdc++.so"):
        out = subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True)
        libs.append(out.stdout.strip())
    return " ".join(libs)


def test_emulated_kernels_are_clean_under_asan_and_ubsan():
    lib = Path(native.__file__).with_name(native.SIMT_VARIANTS["asan"] + ".so")
    if not lib.exists():
        if os.environ.get("DMAX_REQUIRE_SANITIZER_BUILD"):
            pytest.fail(f"{lib} was not built (setup.sh builds it with DMAX_BUILD_SIMT_ASAN=1)")
        pytest.skip("sanitizer build absent: rebuild with DMAX_BUILD_SIMT_ASAN=1")
    env = dict(os.environ,
               DMAX_SIMT_VARIANT="asan",
               LD_PRELOAD=_asan_runtime(),
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
               DMAX_SANITIZER_RUN="1")
    files = [str(ROOT / "tests" / f) for f in KERNEL_TESTS if (ROOT / "tests" / f).exists()]
    assert files, "no kernel test files found"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-k", "simt", "-p",
                           "no:cacheprovider", *files], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=1500)
    tail = (proc.stdout[-4000:] + "\n" + proc.stderr[-4000:])
    assert proc.returncode == 0, f"sanitized emulated kernel tests failed:\n{tail}"
    assert " passed" in proc.stdout, f"no emulated test ran under the sanitizers:\n{tail}"
