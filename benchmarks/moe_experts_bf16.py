"""A/B of dmax.moe_experts' bfloat16 GEMM forms on one llada2-small MoE layer, in one process:
DMAX_CPU_BF16_DOT=off (float32 FMAs on converted weights) against auto (AVX512-BF16 dot products
where cpu_features.h enables them), and the float32 kernel for reference. 32 tokens routed top-8
by a random router (softmax over the preset's experts). Hot: one layer's weights, reused (in
cache after the first call); cold: a different layer's weights per call, cycling through enough
layers to exceed the last-level cache. Interleaved rounds, medians, 1 thread.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/moe_experts_bf16.py [--rounds 15]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))
from dmax_ext import ops  # noqa: E402
from dmax_ext.model import PRESETS  # noqa: E402


def layer(cfg, dtype, gen):
    E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    gate_up = (torch.randn(E, H, 2 * I, generator=gen) / H ** 0.5).to(dtype)
    down = (torch.randn(E, I, H, generator=gen) / I ** 0.5).to(dtype)
    return gate_up, down


def routing(cfg, tokens, gen):
    x = torch.randn(tokens, cfg.hidden_size, generator=gen)
    router = torch.randn(cfg.num_experts, cfg.hidden_size, generator=gen) / cfg.hidden_size ** 0.5
    probs = torch.softmax(x @ router.T, dim=-1)
    weights, ids = probs.topk(cfg.num_experts_per_tok, dim=-1)
    return x, ids, (weights / weights.sum(-1, keepdim=True)).float()


def time_calls(fn, calls):
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llada2-small")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=20, help="calls per timing")
    ap.add_argument("--cold-layers", type=int, default=8)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = PRESETS[args.preset]
    gen = torch.Generator().manual_seed(0)
    x, ids, weights = routing(cfg, args.tokens, gen)
    layers = {dt: [layer(cfg, dt, gen) for _ in range(args.cold_layers)]
              for dt in (torch.bfloat16, torch.float32)}
    xs = {dt: x.to(dt) for dt in layers}
    counts = torch.bincount(ids.flatten(), minlength=cfg.num_experts)
    mb = sum(t.numel() * t.element_size() for t in layers[torch.bfloat16][0]) / 2**20
    print(f"{args.preset}: E={cfg.num_experts} H={cfg.hidden_size} I={cfg.moe_intermediate_size} "
          f"top-{cfg.num_experts_per_tok}, {args.tokens} tokens: {int((counts > 0).sum())} busy "
          f"experts, rows per busy expert max {int(counts.max())}; bf16 layer {mb:.1f} MiB, "
          f"cold: {args.cold_layers} layers cycled; capability "
          f"{torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}")

    def run(dt, temp):
        ls = layers[dt]
        state = {"i": 0}

        def call():
            gu, dn = ls[state["i"] % len(ls)] if temp == "cold" else ls[0]
            state["i"] += 1
            ops.moe_experts(xs[dt], ids, weights, gu, dn)
        return call

    variants = [("bf16 DMAX_CPU_BF16_DOT=off", torch.bfloat16, "off"),
                ("bf16 DMAX_CPU_BF16_DOT=auto", torch.bfloat16, "auto"),
                ("float32", torch.float32, "auto")]
    times = {(name, temp): [] for name, *_ in variants for temp in ("hot", "cold")}
    for name, dt, env in variants:  # warm-up
        os.environ["DMAX_CPU_BF16_DOT"] = env
        run(dt, "hot")()
    for _ in range(args.rounds):
        for temp in ("hot", "cold"):
            for name, dt, env in variants:
                os.environ["DMAX_CPU_BF16_DOT"] = env
                times[(name, temp)].append(time_calls(run(dt, temp), args.calls))
    for temp in ("hot", "cold"):
        base = statistics.median(times[(variants[0][0], temp)])
        for name, *_ in variants:
            med = statistics.median(times[(name, temp)])
            print(f"  {temp:4s} {name:28s} {med:7.3f} ms/layer  ({base / med:4.2f}x vs bf16 off)")


if __name__ == "__main__":
    main()
