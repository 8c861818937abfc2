"""A/B of a CPU switch on llada2-small's block forward, in one process.

The switches the native kernels read at every call (DMAX_CPU_PACKED_EXPERTS, DMAX_CPU_PREFETCH,
DMAX_CPU_BF16_DOT) change no result, only speed, and the VM this project measures on moves a
forward by 5-10% between minutes (docs/PERFORMANCE.md). So both settings run in the same process
on the same captured steps (block_forward.py: the later SPD steps of decoding prompt 0), the
order of the two flipped every round; the figure is the median of each setting and the number of
rounds in which B was faster.

    python benchmarks/switch_ab.py DMAX_CPU_PACKED_EXPERTS off auto --dtype bfloat16
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "python"))

import block_forward  # noqa: E402
import tps  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("variable", help="the environment variable, e.g. DMAX_CPU_PACKED_EXPERTS")
    p.add_argument("a", help="setting A (the baseline)")
    p.add_argument("b", help="setting B")
    p.add_argument("--preset", default="llada2-small")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--steps", type=int, default=4, help="captured block steps, each run a round")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


class ReplayedSteps:
    """The preset's benchmark model and `n_steps` later block steps of decoding prompt 0
    (block_forward.capture_block_steps), each with a cache of its own, replayed on call: the
    workload of this A/B and of build_ab.py's."""

    def __init__(self, preset: str, dtype: torch.dtype, n_steps: int):
        self.model = tps.synthetic_model(preset, "cpu", dtype)
        prompt = tps.synthetic_prompts(self.model.config, 1)
        self.steps = block_forward.spread(block_forward.capture_block_steps(
            self.model, prompt, gen_length=256, block_length=32, threshold=0.5), n_steps)
        self.caches = [self.model.new_cache(s.batch, s.write_slot + s.block_length)
                       for s in self.steps]

    def forward_ms(self, repeats: int = 1) -> float:
        """The mean time of one block forward over `repeats` passes over the steps (call under
        torch.inference_mode())."""
        start = time.perf_counter()
        for _ in range(repeats):
            for step, cache in zip(self.steps, self.caches):
                block_forward.replay(self.model, step, cache)
        return 1e3 * (time.perf_counter() - start) / (repeats * len(self.steps))


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    replayed = ReplayedSteps(args.preset, getattr(torch, args.dtype), args.steps)
    steps = replayed.steps
    settings = (args.a, args.b)
    times = {s: [] for s in settings}

    def forwards_ms(setting: str) -> float:
        os.environ[args.variable] = setting
        # A frozen model keeps what the switches chose (LLaDA2MoeModel.frozen): one per setting.
        with block_forward.as_in_decode(replayed.model):
            return replayed.forward_ms()

    before = os.environ.get(args.variable)
    try:
        with torch.inference_mode():
            for setting in settings:  # warm-up: caches, packed copies, pages
                forwards_ms(setting)
            for r in range(args.rounds):
                for setting in settings if r % 2 else settings[::-1]:
                    times[setting].append(forwards_ms(setting))
    finally:  # the caller's environment as it was
        if before is None:
            os.environ.pop(args.variable, None)
        else:
            os.environ[args.variable] = before
    a, b = (statistics.median(times[s]) for s in settings)
    wins = sum(tb < ta for ta, tb in zip(times[args.a], times[args.b]))
    print(f"{args.preset} {args.dtype}, {torch.get_num_threads()} thread(s), "
          f"{torch.backends.cpu.get_cpu_capability()}: one block forward (mean of {len(steps)} "
          f"later steps, write slots {[s.write_slot for s in steps]}), median of {args.rounds} "
          f"rounds:\n  {args.variable}={args.a}: {a:.3f} ms\n  {args.variable}={args.b}: "
          f"{b:.3f} ms ({a / b:.3f}x; faster in {wins} of {args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
