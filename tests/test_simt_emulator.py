"""Canaries of the simt CUDA emulator (csrc/simt): each tiny kernel in tests/simt/ exhibits one
bug class of the emulator's checklist, and the test asserts the specific diagnostic, so a check
that silently stops firing fails here. The canaries are plain C++ programs built once per session
with g++ (-O1 -g, plus an ASan+UBSan variant of the shared-memory overrun canaries).
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.simt

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CANARY_DIR = ROOT / "tests" / "simt"
SEEDS = (0, 1, 12345)
SITE = r"canaries\.cpp:\d+(?::\d+)?"


def _cuda_include() -> Path:
    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if base and (Path(base) / "include" / "cuda_bf16.h").exists():
            return Path(base) / "include"
    pytest.skip("cuda_fp16.h / cuda_bf16.h not found (set CUDA_HOME)")


def _compile(source: Path, exe: Path, extra: list) -> Path:
    if shutil.which("g++") is None:
        pytest.skip("g++ not available")
    cmd = ["g++", "-std=c++17", "-O1", "-g", "-fno-strict-aliasing", "-Wall", "-Wextra",
           f"-I{CSRC}", f"-I{_cuda_include()}", *extra, str(source), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"compiling {source.name} failed:\n{proc.stderr[-4000:]}"
    return exe


@pytest.fixture(scope="session")
def canaries(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("simt_canaries")
    return _compile(CANARY_DIR / "canaries.cpp", out / "canaries", [])


@pytest.fixture(scope="session")
def asan_canaries(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("simt_asan_canaries")
    return _compile(CANARY_DIR / "asan_canaries.cpp", out / "asan_canaries",
                    ["-fsanitize=address,undefined", "-DSIMT_SANITIZE"])


def run(exe: Path, name: str, seed: int = 0, expect_error: bool = False) -> str:
    proc = subprocess.run([str(exe), name, str(seed)], capture_output=True, text=True,
                          timeout=300)
    if expect_error:
        assert proc.returncode == 3, f"{name} (seed {seed}) raised no simt::Error:\n{proc.stdout}{proc.stderr}"
        assert proc.stdout.startswith("simt::Error: simt: "), proc.stdout
    else:
        assert proc.returncode == 0, f"{name} (seed {seed}) failed:\n{proc.stdout}{proc.stderr}"
    return proc.stdout.strip()


# ---- bug classes ---------------------------------------------------------------------------

def test_missing_barrier_shows_under_schedules(canaries):
    sums = {seed: run(canaries, "missing_barrier", seed) for seed in SEEDS}
    assert sums[0] == "sum -62"  # forward order: every neighbour still holds the poison (-1)
    # reverse order: all but one neighbour already written; that one holds seed 1's poison
    # 0x7F7F7F7F instead of -1: 2078 + 1 + 2139062143
    assert sums[1] == "sum 2139064222"
    assert len(set(sums.values())) == 3, sums


def test_missing_loop_barrier_shows_under_warp_greedy_phases(canaries):
    """A tile loop missing the barrier at its top is right under interleaved turns (the warp
    collectives keep the warps in step) and wrong once a random schedule runs one warp ahead
    (csrc/simt/block.h, schedule_warp_greedy: half the phases of a random seed)."""
    assert run(canaries, "missing_loop_barrier", 0) == "wrong sums 0"
    assert run(canaries, "missing_loop_barrier", 1) == "wrong sums 0"
    outs = [run(canaries, "missing_loop_barrier", seed) for seed in (12345, 2, 3, 4)]
    assert any(out != "wrong sums 0" for out in outs), outs


def test_divergent_syncthreads_names_kernel_block_threads_and_sites(canaries):
    out = run(canaries, "divergent_barrier", 0, expect_error=True)
    assert re.search(r"kernel 'divergent_barrier_kernel' block \(0,0,0\): divergent __syncthreads: "
                     rf"thread \(0,0,0\) waits at {SITE} \(#1\) but thread \(32,0,0\) waits at "
                     rf"{SITE} \(#1\)", out), out
    out = run(canaries, "divergent_barrier", 1, expect_error=True)  # blocks in reverse too
    assert "block (1,0,0): divergent __syncthreads: thread (63,0,0)" in out, out
    assert "divergent __syncthreads" in run(canaries, "divergent_barrier", 12345, expect_error=True)


def test_thread_exiting_before_a_barrier_is_divergence(canaries):
    for seed in SEEDS:
        out = run(canaries, "exit_before_barrier", seed, expect_error=True)
        assert re.search(rf"divergent __syncthreads: thread \(\d+,0,0\) waits at {SITE} \(#1\) "
                         r"but thread \(40,0,0\) exited after 0 __syncthreads", out), out


def test_full_mask_under_divergent_branch(canaries):
    out = run(canaries, "wrong_mask", 0, expect_error=True)
    assert re.search(rf"kernel 'wrong_mask_kernel' block \(0,0,0\): deadlock: __shfl_xor_sync at "
                     rf"{SITE} by thread \(0,0,0\) \(lane 0, mask 0xffffffff\) cannot complete: "
                     r"lane 16 \(thread \(16,0,0\)\) has exited", out), out
    out = run(canaries, "wrong_mask", 1, expect_error=True)  # the exit is seen on arrival
    assert re.search(r"by thread \(15,0,0\) \(lane 15, mask 0xffffffff\): lane 16 "
                     r"\(thread \(16,0,0\)\) has exited", out), out


def test_full_mask_in_partial_last_warp(canaries):
    for seed in SEEDS:
        out = run(canaries, "partial_warp", seed, expect_error=True)
        assert "kernel 'partial_warp_kernel' block (0,0,0): __shfl_down_sync at" in out, out
        assert ("the mask names lane 16, which does not exist (this warp has 16 threads)"
                in out), out


def test_lanes_at_different_sites(canaries):
    out = run(canaries, "split_sites", 0, expect_error=True)
    assert re.search(rf"__shfl_sync at {SITE} by thread \(16,0,0\) \(lane 16, mask 0xffffffff\): "
                     rf"lane 0 \(thread \(0,0,0\)\) waits in __shfl_sync at {SITE} with mask "
                     r"0xffffffff", out), out


def test_caller_not_in_mask_and_bad_width(canaries):
    out = run(canaries, "caller_not_in_mask", 0, expect_error=True)
    assert "(lane 0, mask 0xfffffffe): the calling lane is not in the mask" in out, out
    out = run(canaries, "bad_width", 0, expect_error=True)
    assert "width 12 is not a power of two <= 32" in out, out


def test_barrier_while_lane_waits_in_warp_collective(canaries):
    out = run(canaries, "barrier_in_warp_op", 0, expect_error=True)
    assert re.search(rf"deadlock: thread \(1,0,0\) waits at {SITE} \(#1\) while __shfl_xor_sync at "
                     rf"{SITE} by thread \(0,0,0\) \(lane 0, mask 0xffffffff\) waits for it", out)


def test_uninitialized_shared_read_is_poison(canaries):
    # 2 warps wrote red[0..1]; 30 lanes read poison bytes. Seed 0 (and even random seeds)
    # fill with 0xFF: NaN as float, -1 as int. Seed 1 (and odd random seeds) fill with 0x7F:
    # 3.4e38 as float (the sum overflows to inf), 0x7F7F7F7F as int (the sum wraps).
    assert re.fullmatch(r"float -?nan -?nan int -28 -28", run(canaries, "uninit_shared", 0))
    assert re.fullmatch(r"float inf inf int -252645148 -252645148",
                        run(canaries, "uninit_shared", 1))
    assert run(canaries, "uninit_shared", 12345) == run(canaries, "uninit_shared", 1)


def test_dynamic_smem_overrun_is_caught_by_canary(canaries):
    out = run(canaries, "dyn_smem_overrun", 0, expect_error=True)
    assert ("kernel 'dyn_smem_overrun_kernel' block (0,0,0): dynamic shared memory overrun: a "
            "write at byte offset 256 of the 256-byte buffer") in out, out
    # A read past the end sees the canary, which is NaN as float.
    assert re.fullmatch(r"last -?nan", run(canaries, "dyn_smem_read_overrun"))


def test_launch_configurations_cuda_rejects(canaries):
    lines = run(canaries, "launch_limits").splitlines()
    prefix = "simt: kernel 'empty_kernel': invalid launch configuration: "
    assert lines == [
        prefix + "block (1025,1,1) exceeds the maximum (1024,1024,64)",
        prefix + "block (32,33,1) has 1056 threads, more than 1024",
        prefix + "zero dimension in grid (0,1,1) or block (32,1,1)",
        prefix + "block (1,1,65) exceeds the maximum (1024,1024,64)",
        prefix + "grid (1,65536,1) exceeds the maximum (2147483647,65535,65535)",
        prefix + "232449 bytes of dynamic shared memory, more than 227 KiB (232448)",
        "limits accepted 1",
    ]


def test_outside_kernel_and_reuse_after_error(canaries):
    out = run(canaries, "outside_kernel", expect_error=True)
    assert out == "simt::Error: simt: __syncthreads called outside a kernel launch"
    assert run(canaries, "reuse_after_error", 12345) == "first launch failed\nthen 64 64"


# ---- correct kernels -----------------------------------------------------------------------

def test_block_reduction_is_schedule_independent(canaries):
    outs = {seed: run(canaries, "reduction", seed) for seed in SEEDS}
    assert outs[0] == outs[1] == outs[12345]
    lines = outs[0].splitlines()
    host = float(lines[-1].split()[1])
    for line in lines[:-1]:  # blockDim 1024, 256, 96: the first row's sum
        assert float(line.split()[0]) == pytest.approx(host, abs=1e-3)


def test_shuffles_match_host_lane_arithmetic(canaries):
    for seed in (0, 12345):
        assert run(canaries, "shuffles", seed) == "shuffle mismatches 0"


def test_shuffle_from_lane_outside_mask_is_poison(canaries):
    assert run(canaries, "outside_source") == "lane14 1 7 lane15 nan 0xdeadbeef"


def test_votes_atomics_and_counting_barriers(canaries):
    for seed in (0, 12345):
        assert run(canaries, "votes", seed) == "vote mismatches 0"
        assert run(canaries, "atomics", seed) == (
            "add 288 max 287 min -287 u 576 umax 287 ull 864 f 144 d 72 exch_once 1 "
            "distinct_old 288")
        assert run(canaries, "barrier_count", seed) == "count 34 and 1 or 1"


def test_wmma_products_match_a_double_computation(canaries):
    """simt/wmma.h: m16n16k16 products of __half and __nv_bfloat16 tiles into float, B row- and
    column-major, C / D in either memory layout, under every schedule."""
    for seed in SEEDS:
        assert run(canaries, "wmma", seed) == "wmma mismatches 0"


def test_wmma_fragments_hide_their_layout(canaries):
    """A kernel that writes a fragment's elements where it guesses they sit gets them elsewhere
    (CUDA leaves the layout unspecified; the emulation's is none a GPU uses)."""
    out = run(canaries, "wmma_layout_guess")
    misplaced = int(re.fullmatch(r"misplaced (\d+) of 256", out).group(1))
    assert misplaced > 200, out


def test_wmma_requirements_are_errors(canaries):
    out = run(canaries, "wmma_misaligned", expect_error=True)
    assert "wmma::load_matrix_sync: the pointer is not 256-bit aligned" in out, out
    out = run(canaries, "wmma_half_warp", expect_error=True)
    assert re.search(r"__syncwarp at wmma\.h:\d+ .*lane 16 .*has exited", out), out


def test_cost_per_block(canaries):
    out = run(canaries, "perf")
    ms = float(out.split()[1])
    print(out)
    assert ms < 200, out  # about 6-10 ms on the 2-core CI machine at -O1


# ---- sanitizer build -----------------------------------------------------------------------

def _run_asan(exe: Path, which: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0")
    return subprocess.run([str(exe), which], capture_output=True, text=True, env=env, timeout=120)


def test_asan_sees_shared_memory_overruns(asan_canaries):
    clean = _run_asan(asan_canaries, "clean")
    assert clean.returncode == 0 and "finished" in clean.stdout, clean.stderr[-3000:]
    dyn = _run_asan(asan_canaries, "dynamic")
    assert dyn.returncode != 0
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in dyn.stderr, dyn.stderr[-3000:]
    assert "dynamic_overrun_kernel" in dyn.stderr
    static = _run_asan(asan_canaries, "static")
    assert static.returncode != 0
    assert "ERROR: AddressSanitizer: global-buffer-overflow" in static.stderr, static.stderr[-3000:]
    assert "located 0 bytes to the right of global variable 's'" in static.stderr
