"""Tensor parallel MoE: split each expert's SwiGLU (intermediate columns) or split the experts?

    python benchmarks/tp_experts.py [--preset llada2-small] [--tp 2] [--repeats 40]

Times ONE rank's routed-expert work on one CPU thread (a rank's share of the cores; best of
--repeats, variants interleaved) for a 32-token block (a later step) and a 64-token first step,
with the model's own expert kernels
(moe._experts_cpu, "auto" on CPU). Both splits need the same single all_reduce of [tokens, H]
per MoE layer, so communication is left out. For the expert split the slowest rank is what a
step waits for: its time is the max over ranks. Routing scenarios:
  distinct  random hidden states: routing spread over the experts (~uniform)
  masked    a block of near-identical hidden states (the mask embeddings of a fresh block):
            every token picks (nearly) the same 8 experts
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from dmax_ext.model import random_model  # noqa: E402
from dmax_ext.model.moe import MoeBlock, _experts_cpu  # noqa: E402


def expert_output(x, ids, weights, gate_up, down, first_expert: int):
    """sum_k weights * expert(x) over the assignments whose expert is held here (experts
    [first_expert, first_expert + gate_up.shape[0])); the others contribute 0."""
    n_local = gate_up.shape[0]
    token, slot = torch.nonzero((ids >= first_expert) & (ids < first_expert + n_local),
                                as_tuple=True)
    local = ids[token, slot] - first_expert
    order = local.argsort(stable=True)
    token, slot, local = token[order], slot[order], local[order]
    counts = torch.bincount(local, minlength=n_local)
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
    if token.numel():
        y = _experts_cpu(x[token], counts, gate_up, down).float() * weights[token, slot, None]
        out.index_add_(0, token, y)
    return out.to(x.dtype)


def time_ms(fns: dict, repeats: int) -> dict:
    """Best-of-`repeats` ms of each function, called round-robin so that the load of a shared
    machine falls on every variant alike (the minimum is the least noisy estimate)."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: 1e3 * t for name, t in best.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llada2-small")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--repeats", type=int, default=40)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    tp = args.tp
    print(f"preset {args.preset}, tp {tp}, 1 thread per rank; best-of-N ms of one rank's "
          f"routed experts (expert split: slowest rank)")
    print(f"{'dtype':<9} {'tokens':>6} {'routing':<9} {'tp=1':>8} {'split SwiGLU':>13} "
          f"{'split experts':>14} {'busy/rank (expert split)':>25}")
    for dtype in (torch.float32, torch.bfloat16):
        model = random_model(args.preset, dtype=dtype, seed=0)
        moe = next(layer.mlp for layer in model.model.layers if isinstance(layer.mlp, MoeBlock))
        gate_up, down = moe.experts.gate_up_proj.detach(), moe.experts.down_proj.detach()
        n_exp, hidden, two_i = gate_up.shape
        inter = two_i // 2
        cols = inter // tp
        for tokens in (32, 64):
            generator = torch.Generator().manual_seed(1)
            for routing in ("distinct", "masked"):
                if routing == "distinct":
                    x = torch.randn(tokens, hidden, generator=generator)
                else:
                    x = torch.randn(1, hidden, generator=generator) \
                        + 0.01 * torch.randn(tokens, hidden, generator=generator)
                x = x.to(dtype)
                with torch.inference_mode():
                    ids, weights = moe.gate(x)
                    # Split SwiGLU: rank 0's columns (every rank has the same shapes and work).
                    gu0 = torch.cat([gate_up[..., :cols], gate_up[..., inter:inter + cols]], -1)
                    d0 = down[:, :cols].contiguous()
                    fns = {"full": lambda: expert_output(x, ids, weights, gate_up, down, 0),
                           "columns": lambda: expert_output(x, ids, weights, gu0, d0, 0)}
                    busy = []
                    for r in range(tp):
                        lo, hi = r * n_exp // tp, (r + 1) * n_exp // tp
                        gu, d = gate_up[lo:hi].contiguous(), down[lo:hi].contiguous()
                        fns[r] = (lambda gu=gu, d=d, lo=lo:
                                  expert_output(x, ids, weights, gu, d, lo))
                        busy.append(int(torch.unique(ids[(ids >= lo) & (ids < hi)]).numel()))
                    ms = time_ms(fns, args.repeats)
                    full, col = ms["full"], ms["columns"]
                    per_rank = [ms[r] for r in range(tp)]
                print(f"{str(dtype).removeprefix('torch.'):<9} {tokens:>6} {routing:<9} "
                      f"{full:>8.2f} {col:>13.2f} {max(per_rank):>14.2f} "
                      f"{'/'.join(map(str, busy)):>25}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
