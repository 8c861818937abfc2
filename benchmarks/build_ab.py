"""A/B of two builds of dmax_ext on llada2-small's block forward, interleaved.

A change to the native kernels cannot be flipped inside one process (both builds register the
same ops), and the VM this project measures on moves a forward by 5-10% between minutes
(docs/PERFORMANCE.md): runs of the two builds one after the other compare minutes, not code. So
each build runs in a worker process of its own on the same workload (switch_ab.ReplayedSteps:
the later SPD steps of decoding prompt 0), and the two take turns a few forwards at a time, the
order flipped every round; the figure is each build's median and the rounds B won.

    git archive <commit> | tar -x -C /tmp/before
    (cd /tmp/before && DMAX_BUILD_CUDA=0 DMAX_BUILD_SIMT=0 python setup.py build_ext --inplace)
    python benchmarks/build_ab.py /tmp/before/python python --dtype bfloat16

Each path is a folder holding the dmax_ext package (with its built library); the workload is
this checkout's benchmarks, so both builds run the same steps.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path, help="the folder holding build A's dmax_ext (the baseline)")
    p.add_argument("b", type=Path, help="the folder holding build B's dmax_ext")
    p.add_argument("--preset", default="llada2-small")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--repeats", type=int, default=5, help="passes over the steps a turn")
    p.add_argument("--steps", type=int, default=4, help="captured block steps")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def worker(package: str, preset: str, dtype: str, n_steps: int, threads: int) -> None:
    """A build's process: dmax_ext from `package` (imported before the benchmarks, which would
    otherwise put this checkout's first), then one line per request on stdin: the number of
    passes; answered with the mean forward time in ms."""
    sys.path.insert(0, package)
    import dmax_ext  # noqa: F401  (cached in sys.modules: the benchmarks' imports get this one)
    if not Path(dmax_ext.__file__).resolve().is_relative_to(Path(package).resolve()):
        raise SystemExit(f"dmax_ext came from {dmax_ext.__file__}, not {package}")
    sys.path.insert(1, str(HERE))
    import torch
    import block_forward
    import switch_ab
    torch.set_num_threads(threads)
    replayed = switch_ab.ReplayedSteps(preset, getattr(torch, dtype), n_steps)
    with torch.inference_mode(), block_forward.as_in_decode(replayed.model):
        replayed.forward_ms()  # warm-up: caches, packed copies, pages
        print("ready", flush=True)
        for line in sys.stdin:
            print(replayed.forward_ms(int(line)), flush=True)


class Build:
    def __init__(self, package: Path, args):
        self.package = package
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(package), args.preset, args.dtype,
             str(args.steps), str(args.threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"the worker of {package} did not start (its error is above)")

    def forward_ms(self, repeats: int) -> float:
        self.proc.stdin.write(f"{repeats}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main(argv=None) -> int:
    args = parse_args(argv)
    for package in (args.a, args.b):
        if not (package / "dmax_ext" / "__init__.py").is_file():
            raise SystemExit(f"{package} holds no dmax_ext package")
    builds = [Build(args.a, args), Build(args.b, args)]
    times: list[list[float]] = [[], []]
    try:
        for r in range(args.rounds):
            for i in ((0, 1) if r % 2 else (1, 0)):
                times[i].append(builds[i].forward_ms(args.repeats))
    finally:
        for build in builds:
            build.close()
    a, b = (statistics.median(t) for t in times)
    wins = sum(tb < ta for ta, tb in zip(*times))
    print(f"{args.preset} {args.dtype}, {args.threads} thread(s): one block forward, median of "
          f"{args.rounds} interleaved rounds of {args.repeats} x {args.steps} forwards:\n"
          f"  A {args.a}: {a:.3f} ms\n  B {args.b}: {b:.3f} ms ({a / b:.3f}x; B faster in "
          f"{wins} of {args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, package, preset, dtype, n_steps, threads = sys.argv
        worker(package, preset, dtype, int(n_steps), int(threads))
    else:
        sys.exit(main())
