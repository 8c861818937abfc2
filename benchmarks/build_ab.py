"""A/B of two builds of dmax_ext on llada2-small, interleaved: its block forward, or whole decodes.

A change to the native kernels cannot be flipped inside one process (both builds register the
same ops), and the VM this project measures on moves a forward by 5-10% between minutes
(docs/PERFORMANCE.md): runs of the two builds one after the other compare minutes, not code. So
each build runs in a worker process of its own on the same workload, and the two take turns a
few forwards (or decodes) at a time, the order flipped every round; the figure is each build's
median and the rounds B won. Workloads:
  forward (default): switch_ab.ReplayedSteps, the later SPD steps of decoding prompt 0, each
      replayed in turn (as decode() runs them: model.frozen());
  decode: decode() of --prompts synthetic prompts one by one (batch 1, --gen-length tokens):
      everything a decode does, its per-block state included; the figure is ms per token.

    git archive <commit> | tar -x -C /tmp/before
    (cd /tmp/before && DMAX_BUILD_CUDA=0 DMAX_BUILD_SIMT=0 python setup.py build_ext --inplace)
    python benchmarks/build_ab.py /tmp/before/python python --dtype bfloat16 [--workload decode]

Each path is a folder holding the dmax_ext package (with its built library); the workload is
this checkout's benchmarks, so both builds run the same steps.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
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
    p.add_argument("--workload", default="forward", choices=["forward", "decode"])
    p.add_argument("--prompts", type=int, default=2, help="decode: prompts a turn")
    p.add_argument("--gen-length", type=int, default=128, help="decode: tokens a prompt")
    return p.parse_args(argv)


def worker(package: str, settings: dict) -> None:
    """A build's process: dmax_ext from `package` (imported before the benchmarks, which would
    otherwise put this checkout's first), then one line per request on stdin: the number of
    passes; answered with the mean time in ms of a forward (workload forward) or of a generated
    token (decode)."""
    sys.path.insert(0, package)
    import dmax_ext  # noqa: F401  (cached in sys.modules: the benchmarks' imports get this one)
    if not Path(dmax_ext.__file__).resolve().is_relative_to(Path(package).resolve()):
        raise SystemExit(f"dmax_ext came from {dmax_ext.__file__}, not {package}")
    sys.path.insert(1, str(HERE))
    import torch
    torch.set_num_threads(settings["threads"])
    dtype = getattr(torch, settings["dtype"])
    if settings["workload"] == "decode":
        import tps
        from dmax_ext.decoding import decode
        model = tps.synthetic_model(settings["preset"], "cpu", dtype)
        prompts = tps.synthetic_prompts(model.config, settings["prompts"])

        def run(repeats: int) -> float:
            start, tokens = time.perf_counter(), 0
            for _ in range(repeats):
                for prompt in prompts:
                    result = decode(model, [prompt], gen_length=settings["gen_length"])
                    tokens += len(result.tokens[0])
            return 1e3 * (time.perf_counter() - start) / tokens
        context = contextlib.nullcontext()
    else:
        import block_forward
        import switch_ab
        replayed = switch_ab.ReplayedSteps(settings["preset"], dtype, settings["steps"])
        run = replayed.forward_ms
        context = block_forward.as_in_decode(replayed.model)
    with torch.inference_mode(), context:
        run(1)  # warm-up: caches, packed copies, pages
        print("ready", flush=True)
        for line in sys.stdin:
            print(run(int(line)), flush=True)


class Build:
    def __init__(self, package: Path, args):
        self.package = package
        settings = {key: getattr(args, key) for key in ("preset", "dtype", "steps", "threads",
                                                        "workload", "prompts", "gen_length")}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(package), json.dumps(settings)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"the worker of {package} did not start (its error is above)")

    def time_ms(self, repeats: int) -> float:
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
                times[i].append(builds[i].time_ms(args.repeats))
    finally:
        for build in builds:
            build.close()
    a, b = (statistics.median(t) for t in times)
    wins = sum(tb < ta for ta, tb in zip(*times))
    if args.workload == "decode":
        what = (f"decode (batch 1, {args.gen_length} tokens), ms per token, median of {args.rounds} "
                f"interleaved rounds of {args.repeats} x {args.prompts} prompts")
    else:
        what = (f"one block forward, median of {args.rounds} interleaved rounds of "
                f"{args.repeats} x {args.steps} forwards")
    print(f"{args.preset} {args.dtype}, {args.threads} thread(s): {what}:\n"
          f"  A {args.a}: {a:.3f} ms\n  B {args.b}: {b:.3f} ms ({a / b:.3f}x; B faster in "
          f"{wins} of {args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, package, settings = sys.argv
        worker(package, json.loads(settings))
    else:
        sys.exit(main())
