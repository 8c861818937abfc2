"""Kernel benchmarks: every fused op against its eager reference and torch.compile(reference);
block_attention also against SDPA (the "plain" column: what the model ran before the op; on
CUDA, given the model's bool mask and grouped heads, SDPA's math path).

    python benchmarks/kernels.py                 # B in {1, 8, 32}, L = 32, V = 157184, H = 2048
    python benchmarks/kernels.py --quick         # one small point per op (CI, CPU)
    python benchmarks/kernels.py --verify --ops logits_stats --device cpu   # its rows only

One table, BENCHES: a name -> Bench(build, fused, reference, check[, plain]). `build(B, L, device)`
returns the op's inputs and the bytes the op must move at least (for the bandwidth column);
`fused` and `reference` take those inputs; `check(inputs, fused_out, reference_out)` raises when
they disagree (--verify runs it before timing); `plain`, optional, is the plain PyTorch a user
would write instead (same inputs, not necessarily the same tie or sampling rules: timing only).
Add a row to add an op.

Timing: a warm-up call, then the median of up to --repeats calls (within a time budget per
cell: the references are slow at B = 32). On CUDA the table also gives the achieved bandwidth,
and its fraction of a device-to-device copy of the same size measured in the same run.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from dmax_ext import ops, reference

VOCAB, HIDDEN, LENGTH = 157184, 2048, 32
MASK_ID = 156895  # LLaDA2's (dmax_ext.model.config); inputs only, no semantics here


@dataclass
class Bench:
    build: Callable[[int, int, torch.device], tuple[tuple, int]]  # -> (inputs, bytes moved)
    fused: Callable[..., Any]
    reference: Callable[..., Any]
    check: Callable[[tuple, Any, Any], None]  # (inputs, fused out, reference out)
    plain: Callable[..., Any] | None = None


# ---- logits_stats / onpolicy_noise ------------------------------------------------------------


def _logits_inputs(k: int, temperature: float, dtype=torch.bfloat16):
    def build(B, L, device):
        gen = torch.Generator(device=device).manual_seed(0)
        logits = (torch.randn(B, L, VOCAB, generator=gen, device=device) * 3).to(dtype)
        seeds = torch.arange(B, device=device) + 17
        moved = logits.numel() * logits.element_size() + B * L * (k + 1) * 12
        return (logits, k, temperature, seeds if temperature > 0 else None), moved
    return build


def _check_logits_stats(inputs, got, want):
    """ids exactly as the reference; probabilities against float64 (the float32 reference is
    itself ~1e-5 off at V = 157184, the fused op ~1e-7)."""
    got = [t.cpu() for t in got]
    for name, g, w in (("pred", got[0], want[0]), ("topk_ids", got[2], want[2])):
        assert torch.equal(g, w.cpu()), f"logits_stats {name} differs from the reference"
    p64 = torch.softmax(inputs[0].cpu().double(), dim=-1)
    for name, g, ids in (("conf", got[1], got[0].unsqueeze(-1)), ("topk_probs", got[3], got[2])):
        torch.testing.assert_close(g.double(), p64.gather(-1, ids).reshape(g.shape), rtol=1e-5,
                                   atol=1e-9, msg=f"logits_stats {name} vs float64 softmax")


def _logits_stats_plain(logits, k, temperature, seeds):
    """softmax + topk (+ multinomial): what one writes without the op (no tie rule, no seeds)."""
    p = torch.softmax(logits.float(), dim=-1)
    topk_probs, topk_ids = p.topk(k, dim=-1)
    if temperature > 0:
        q = torch.softmax(logits.float() / temperature, dim=-1)
        pred = torch.multinomial(q.view(-1, q.shape[-1]), 1).view(q.shape[:-1])
    else:
        pred = topk_ids[..., 0]
    return pred, p.gather(-1, pred.unsqueeze(-1)).squeeze(-1), topk_ids, topk_probs


def _onpolicy_inputs(k: int, temperature: float):
    def build(B, L, device):
        gen = torch.Generator(device=device).manual_seed(0)
        noisy = torch.randint(0, VOCAB, (B, L), generator=gen, device=device)
        noisy[torch.rand(B, L, generator=gen, device=device) < 0.75] = MASK_ID
        flags = torch.arange(B, device=device) % 2 == 0
        topk_ids = torch.randint(0, VOCAB, (B, L, k), generator=gen, device=device)
        probs = torch.rand(B, L, k, generator=gen, device=device).sort(-1, descending=True).values
        probs = probs / probs.sum(-1, keepdim=True)
        seeds = torch.arange(B, device=device) + 5
        moved = B * L * (8 + 8) + B + B * L * k * 12
        return (noisy, flags, topk_ids, probs, temperature, seeds), moved
    return build


def _onpolicy_fused(noisy, flags, topk_ids, probs, temperature, seeds):
    return ops.onpolicy_noise(noisy, flags, topk_ids, probs, temperature, seeds, mask_id=MASK_ID)


def _onpolicy_reference(noisy, flags, topk_ids, probs, temperature, seeds):
    return reference.onpolicy_noise_reference(noisy, flags, topk_ids, probs, temperature, seeds,
                                              mask_id=MASK_ID)


def _check_equal(inputs, got, want):
    assert torch.equal(got.cpu(), want.cpu()), "fused result differs from the reference"


BENCHES: dict[str, Bench] = {
    "logits_stats/k=1": Bench(_logits_inputs(1, 0.0), ops.logits_stats,
                              reference.logits_stats_reference, _check_logits_stats,
                              _logits_stats_plain),
    "logits_stats/k=8": Bench(_logits_inputs(8, 0.0), ops.logits_stats,
                              reference.logits_stats_reference, _check_logits_stats,
                              _logits_stats_plain),
    "logits_stats/k=8/T=1": Bench(_logits_inputs(8, 1.0), ops.logits_stats,
                                  reference.logits_stats_reference, _check_logits_stats,
                                  _logits_stats_plain),
    "onpolicy_noise/k=8/T=1": Bench(_onpolicy_inputs(8, 1.0), _onpolicy_fused,
                                    _onpolicy_reference, _check_equal),
}


# ---- promote / spd_update / hybrid_embed ------------------------------------------------------


def _step_state(B, L, device):
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, VOCAB, (B, L), generator=gen, device=device)
    ids[torch.rand(B, L, generator=gen, device=device) < 0.5] = MASK_ID
    conf = torch.rand(B, L, generator=gen, device=device)
    pred = torch.randint(0, VOCAB, (B, L), generator=gen, device=device)
    active = (ids == MASK_ID) | (torch.rand(B, L, generator=gen, device=device) < 0.5)
    return gen, ids, conf, pred, active


def _promote_inputs(prefix: bool):
    def build(B, L, device):
        _, ids, conf, pred, _ = _step_state(B, L, device)
        return (ids, conf, pred, 0.5, MASK_ID, prefix), B * L * (8 + 4 + 8 + 1)
    return build


def _spd_update_inputs(B, L, device):
    _, ids, conf, pred, active = _step_state(B, L, device)
    promoted = reference.promote_reference(ids, conf, pred, 0.5, MASK_ID)
    return (ids, active, promoted, pred, conf, 0.9, MASK_ID), B * L * (8 + 1 + 1 + 8 + 4 + 8 + 1) + B


def _check_tuple_equal(inputs, got, want):
    for g, w in zip(got, want):
        _check_equal(inputs, g, w)


_WEIGHTS: dict = {}


def _embedding_weight(device):
    """LLaDA2's embedding table shape in bf16 (644 MB), made once per device: the gathered rows
    are spread over it as in the model."""
    if device not in _WEIGHTS:
        _WEIGHTS[device] = torch.empty(VOCAB, HIDDEN, dtype=torch.bfloat16, device=device).normal_()
    return _WEIGHTS[device]


def _hybrid_embed_inputs(k: int):
    def build(B, L, device):
        gen, ids, conf, pred, active = _step_state(B, L, device)
        weight = _embedding_weight(device)
        embeds = weight[ids]
        changed = torch.rand(B, L, generator=gen, device=device) < 0.5
        topk_ids = torch.randint(0, VOCAB, (B, L, k), generator=gen, device=device)
        topk_probs = torch.rand(B, L, k, generator=gen, device=device) / k
        row = HIDDEN * weight.element_size()
        moved = B * L * (k + 2) * row  # at most: k + 1 rows read and one written per position
        return (embeds, weight, ids, active, changed, topk_ids, topk_probs, MASK_ID), moved
    return build


def _hybrid_embed_fused(embeds, *args):
    ops.hybrid_embed(embeds, *args)
    return embeds


def _check_hybrid_embed(inputs, got, want):
    # bf16 output: one rounding apart at most (the float32 sums run in a different order)
    torch.testing.assert_close(got.cpu().float(), want.cpu().float(), rtol=2.0**-7, atol=1e-6,
                               msg="hybrid_embed differs from the reference")


BENCHES.update({
    "promote/spd": Bench(_promote_inputs(True), ops.promote, reference.promote_reference,
                         _check_equal),
    "promote/threshold": Bench(_promote_inputs(False), ops.promote, reference.promote_reference,
                               _check_equal),
    "spd_update": Bench(_spd_update_inputs, ops.spd_update, reference.spd_update_reference,
                        _check_tuple_equal),
    "hybrid_embed/k=1": Bench(_hybrid_embed_inputs(1), _hybrid_embed_fused,
                              reference.hybrid_embed_reference, _check_hybrid_embed),
    "hybrid_embed/k=8": Bench(_hybrid_embed_inputs(8), _hybrid_embed_fused,
                              reference.hybrid_embed_reference, _check_hybrid_embed),
})


# ---- block_attention: a decoding block's attention over the KV cache --------------------------

HEADS, KV_HEADS, HEAD_DIM, SLOTS = 16, 4, 128, 512  # LLaDA2.0-mini's heads; a 512-slot cache


def _block_attention_inputs(B, L, device):
    """L queries a head at the end of a SLOTS-slot span of a longer cache (a strided slice, as
    the model reads it), sequences starting at different slots (the decoding mask)."""
    from dmax_ext.model.attention import cached_attention_mask
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, HEADS, L, HEAD_DIM, generator=gen, device=device).bfloat16()
    cache = torch.randn(2, B, KV_HEADS, SLOTS + 64, HEAD_DIM, generator=gen,
                        device=device).bfloat16()
    keys, values = cache[0][:, :, :SLOTS], cache[1][:, :, :SLOTS]
    valid_from = torch.arange(B, device=device) * 32 % (SLOTS - L)
    mask = cached_attention_mask(valid_from, torch.arange(SLOTS - L, SLOTS, device=device),
                                 SLOTS, L)
    moved = (2 * keys.numel() + 2 * q.numel()) * 2 + mask.numel()
    return (q, keys, values, mask, HEAD_DIM ** -0.5), moved


def _block_attention_sdpa(q, keys, values, mask, scale):
    """What the model ran before the op: SDPA (on CUDA its math path, given a bool mask and
    grouped heads), then the transpose copy into the dense projection's layout."""
    out = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                           scale=scale, enable_gqa=True)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _check_block_attention(inputs, got, want):
    # bf16 outputs of float32 softmax sums taken in another order: a rounding or two apart
    torch.testing.assert_close(got.float(), want.float(), rtol=2.0**-6, atol=2.0**-9,
                               msg="block_attention differs from the reference")


BENCHES["block_attention"] = Bench(_block_attention_inputs, ops.block_attention,
                                   reference.block_attention_reference, _check_block_attention,
                                   _block_attention_sdpa)


# ---- timing -----------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, repeats: int, budget_s: float) -> float:
    """Median wall time of fn() in ms: one warm-up call, then up to `repeats` timed calls, fewer
    when they would exceed budget_s (at least one)."""
    fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (not times or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_gbps(nbytes: int, device: torch.device, repeats: int) -> float:
    """Device-to-device copy bandwidth (read + write) for a buffer of nbytes."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, repeats, 5.0)
    return 2 * nbytes / ms / 1e6


def compiled(fn: Callable, enabled: bool) -> Callable | None:
    if not enabled:
        return None
    try:
        return torch.compile(fn, dynamic=False)
    except Exception:  # noqa: BLE001 - no compiler: the column says "-"
        return None


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}"


def fmt(ms: float | None) -> str:
    return f"{'-':>9}" if ms is None or math.isnan(ms) else f"{ms:9.2f}"


def run(names, devices, batches, length, repeats, budget_s, verify, with_compile) -> None:
    for device in devices:
        print(f"\n{device.type}: {machine(device)}  (torch {torch.__version__})")
        header = (f"{'op':24} {'B':>3} {'L':>3} {'fused ms':>9} {'ref ms':>9} {'compiled':>9} "
                  f"{'plain ms':>9} {'x ref':>7} {'x comp':>7} {'x plain':>7}")
        if device.type == "cuda":
            header += f" {'GB/s':>7} {'of copy':>7}"
        print(header)
        print("-" * len(header))
        for name in names:
            bench = BENCHES[name]
            ref_compiled = compiled(bench.reference, with_compile)
            for B in batches:
                inputs, moved = bench.build(B, length, device)
                if verify:
                    bench.check(inputs, bench.fused(*inputs), bench.reference(*inputs))
                fused_ms = time_ms(lambda: bench.fused(*inputs), device, repeats, budget_s)
                ref_ms = time_ms(lambda: bench.reference(*inputs), device, repeats, budget_s)
                comp_ms = None
                if ref_compiled is not None:
                    try:
                        comp_ms = time_ms(lambda: ref_compiled(*inputs), device, repeats, budget_s)
                    except Exception:  # noqa: BLE001 - a reference inductor cannot compile
                        comp_ms = None
                plain_ms = None
                if bench.plain is not None:
                    plain_ms = time_ms(lambda: bench.plain(*inputs), device, repeats, budget_s)
                ratio = lambda ms: f"{ms / fused_ms:7.1f}" if ms else f"{'-':>7}"  # noqa: E731
                row = (f"{name:24} {B:3d} {length:3d} {fmt(fused_ms)} {fmt(ref_ms)} {fmt(comp_ms)} "
                       f"{fmt(plain_ms)} {ratio(ref_ms)} {ratio(comp_ms)} {ratio(plain_ms)}")
                if device.type == "cuda":
                    gbps = moved / fused_ms / 1e6
                    row += f" {gbps:7.0f} {gbps / copy_gbps(moved, device, repeats):7.0%}"
                print(row, flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default="",
                        help=f"comma-separated rows or ops (an op selects its rows); "
                             f"default all: {', '.join(BENCHES)}")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="all = cpu, plus cuda when a GPU and the CUDA kernels are there")
    parser.add_argument("--quick", action="store_true", help="B = 1, L = 4, few repeats (CI)")
    parser.add_argument("--verify", action="store_true", help="check results before timing")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = [n.strip() for n in args.ops.split(",") if n.strip()]
    names = [n for n in BENCHES
             if not wanted or any(n == w or n.startswith(w + "/") for w in wanted)]
    if not names:
        parser.error(f"no benchmark matches {wanted}; known: {list(BENCHES)}")
    devices = []
    if args.device in ("cpu", "all"):
        devices.append(torch.device("cpu"))
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    elif args.device == "cuda":
        parser.error("--device cuda: no CUDA device")
    batches = [1] if args.quick else [1, 8, 32]
    length = 4 if args.quick else LENGTH
    repeats = args.repeats or (3 if args.quick else 10)
    budget_s = 2.0 if args.quick else float(os.environ.get("DMAX_BENCH_BUDGET_S", 20))
    run(names, devices, batches, length, repeats, budget_s, args.verify,
        with_compile=not (args.no_compile or args.quick))


if __name__ == "__main__":
    main()
