"""Roofline of one block forward: what this machine can move and compute, and what a forward must
read and compute, so that a measured forward time can be set against its floor.

    python benchmarks/roofline.py                          # machine + llada2-small, 32 tokens
    python benchmarks/roofline.py --record-routing         # distinct experts from a real forward
    python benchmarks/roofline.py --preset llada2-mini --dtype bfloat16 --no-measure
    python benchmarks/roofline.py --quick                  # smaller copy, fewer repeats

Machine (measure_machine): copy bandwidth = 2 x tensor bytes / time of dst.copy_(src) (read +
write, STREAM's convention) on a tensor larger than the last-level cache; matmul throughput =
2*M*K*N / time of F.linear(x [M, K], w [N, K]) (the library's GEMM) at a block forward's shapes
(the preset's hidden and dense-MLP sizes, 32 and 64 rows: "small", weights hot in cache) and at a
2048 square ("peak"), and of dmax.skinny_linear (our kernel) at the block's lm_head ("kernel
lm_head"). The floor takes the fastest of them (MachineRoofline.flops_per_s): the machine does at
least that, and where our kernel outruns the library (MKL on AMD: 2x) the library's rate would
set the floor too low. Medians of repeats, at torch's current thread count.

Cost (block_forward_cost): the bytes one forward must read or write at least (each weight it uses
once, only the experts the routing selected, the embedding rows it gathers, the KV cache it attends
to and writes, the logits it produces) and its matmul FLOPs. Activations between ops are not counted
(a block's are small and stay in cache). floor_ms = max(bytes / bandwidth, flops / throughput).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "python") not in sys.path:
    sys.path.insert(0, str(REPO / "python"))

from dmax_ext.model import LLaDA2Config  # noqa: E402
from dmax_ext.model.presets import PRESETS, preset_config  # noqa: E402

COPY_BYTES = 1 << 30          # 1 GiB: past any last-level cache we expect
PEAK_SHAPE = (2048, 2048, 2048)
MATMUL_DTYPES = (torch.float32, torch.bfloat16)
COST_PARTS = ("attention", "dense_mlp", "experts", "shared_expert", "router", "norms", "lm_head",
              "embedding", "kv_read", "kv_write", "logits")


# ---- the machine --------------------------------------------------------------------------------

@dataclass(frozen=True)
class MachineRoofline:
    copy_gbps: float
    matmul_gflops: dict        # dtype name -> {shape label -> GFLOP/s}
    shapes: dict               # shape label -> (M, K, N)
    threads: int
    load_average: tuple = field(default=(), compare=False)  # os.getloadavg() before measuring

    @property
    def bytes_per_s(self) -> float:
        return self.copy_gbps * 1e9

    def fastest_shape(self, dtype: torch.dtype) -> str:
        """The label of the fastest matmul measured in dtype: the floor's throughput."""
        by_shape = self.matmul_gflops[dtype_name(dtype)]
        return max(by_shape, key=by_shape.get)

    def flops_per_s(self, dtype: torch.dtype, shape: str | None = None) -> float:
        """The matmul throughput at `shape`; None: the fastest measured (the floor's)."""
        return self.matmul_gflops[dtype_name(dtype)][shape or self.fastest_shape(dtype)] * 1e9


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _median_seconds(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure_copy_gbps(n_bytes: int = COPY_BYTES, repeats: int = 5) -> float:
    """GB/s of a large float32 tensor copy, counting read + write (2 x n_bytes per copy)."""
    n = n_bytes // 4
    src, dst = torch.ones(n), torch.empty(n)
    dst.copy_(src)  # first touch: page faults are not bandwidth
    return 2 * n * 4 / _median_seconds(lambda: dst.copy_(src), repeats) / 1e9


def measure_matmul_gflops(rows: int, inner: int, cols: int, dtype: torch.dtype,
                          repeats: int = 5, min_sample_s: float = 0.1, linear=F.linear) -> float:
    """GFLOP/s of linear(x [rows, inner], w [cols, inner]) in `dtype` (nn.Linear's layout;
    default F.linear, the library's GEMM). Each sample repeats the call until it lasts
    min_sample_s, so small shapes time well."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, inner, generator=generator).to(dtype)
    w = torch.randn(cols, inner, generator=generator).to(dtype)
    linear(x, w)  # warm-up: library primitive creation, weight packing caches

    def run(n):
        for _ in range(n):
            linear(x, w)
    calls = 1
    while calls < 1 << 16 and _median_seconds(partial(run, calls), 1) < min_sample_s:
        calls *= 2
    return 2 * rows * inner * cols * calls / _median_seconds(partial(run, calls), repeats) / 1e9


KERNEL_PREFIX = "kernel "  # shape labels timed with dmax.skinny_linear instead of F.linear


def matmul_shapes(config: LLaDA2Config, block_length: int = 32) -> dict:
    """A block forward's dense-MLP matmul at one and two blocks of rows, the peak square (the
    library's GEMM), and the block's lm_head (our kernel, where the native library has it)."""
    h, i = config.hidden_size, config.intermediate_size
    shapes = {f"small-{block_length}": (block_length, h, i),
              f"small-{2 * block_length}": (2 * block_length, h, i), "peak": PEAK_SHAPE}
    if _kernel_linear() is not None:
        shapes[f"{KERNEL_PREFIX}lm_head-{block_length}"] = (block_length, h, config.vocab_size)
    return shapes


def _kernel_linear():
    from dmax_ext.ops import has_op
    return torch.ops.dmax.skinny_linear if has_op("skinny_linear") else None


def measure_matmul_rates(shapes: dict, dtypes=MATMUL_DTYPES, repeats: int = 5,
                         min_sample_s: float = 0.1) -> dict:
    """dtype name -> {label -> GFLOP/s} for shapes {label -> (M, K, N)}: F.linear, or
    dmax.skinny_linear for the labels starting with KERNEL_PREFIX."""
    def linear(label):
        return _kernel_linear() if label.startswith(KERNEL_PREFIX) else F.linear
    return {dtype_name(d): {label: measure_matmul_gflops(*shape, d, repeats, min_sample_s,
                                                         linear=linear(label))
                            for label, shape in shapes.items()} for d in dtypes}


def measure_machine(config: LLaDA2Config | None = None, *, copy_bytes: int = COPY_BYTES,
                    repeats: int = 5, block_length: int = 32) -> MachineRoofline:
    """Copy bandwidth and matmul throughput (float32, bfloat16) at the current thread count;
    matmul shapes from `config` (default: the llada2-small preset, the CPU model)."""
    config = config or preset_config("llada2-small")
    load = os.getloadavg()
    shapes = matmul_shapes(config, block_length)
    gflops = measure_matmul_rates(shapes, repeats=repeats)
    return MachineRoofline(copy_gbps=measure_copy_gbps(copy_bytes, repeats), matmul_gflops=gflops,
                           shapes=shapes, threads=torch.get_num_threads(), load_average=load)


# ---- what one block forward must move and compute -----------------------------------------------

@dataclass(frozen=True)
class ForwardCost:
    bytes: dict    # part -> bytes read or written (COST_PARTS)
    flops: dict    # part -> FLOPs (matmuls and attention; 2 per multiply-add)

    @property
    def total_bytes(self) -> float:
        return sum(self.bytes.values())

    @property
    def total_flops(self) -> float:
        return sum(self.flops.values())


def moe_layer_count(config: LLaDA2Config) -> int:
    return sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))


def expected_distinct_experts(config: LLaDA2Config, n_tokens: int,
                              effective_experts: int | None = None) -> float:
    """E[distinct experts one MoE layer runs for n_tokens tokens] = E (1 - (1 - k/E)^n), if every
    token picks each expert with probability k/E independently of the other tokens (uniform
    routing). Skewed or correlated routing touches fewer: for fixed marginals p_e (sum k) the
    count sum_e 1 - (1 - p_e)^n is largest when they are equal. effective_experts: a skew
    scenario, tokens routed uniformly over only that many of the experts."""
    e, k = effective_experts or config.num_experts, config.num_experts_per_tok
    if not k <= e <= config.num_experts:
        raise ValueError(f"effective_experts must be in [{k}, {config.num_experts}], got {e}")
    return e * (1.0 - (1.0 - k / e) ** n_tokens)


def _per_layer_experts(config: LLaDA2Config, distinct_experts, n_routed_tokens: int) -> list:
    n_moe = moe_layer_count(config)
    if distinct_experts is None:
        return [expected_distinct_experts(config, n_routed_tokens)] * n_moe
    if isinstance(distinct_experts, (int, float)):
        distinct_experts = [distinct_experts] * n_moe
    distinct_experts = list(distinct_experts)
    if len(distinct_experts) != n_moe:
        raise ValueError(f"distinct_experts: expected one count per MoE layer ({n_moe}), "
                         f"got {len(distinct_experts)}")
    for d in distinct_experts:
        if not 0 <= d <= min(config.num_experts, n_routed_tokens * config.num_experts_per_tok):
            raise ValueError(f"distinct_experts: {d} is not in [0, min(num_experts, tokens * "
                             f"num_experts_per_tok)]")
    return distinct_experts


def block_forward_cost(config: LLaDA2Config, n_tokens: int, cache_slots: int,
                       distinct_experts: int | float | Sequence | None = None, *, batch: int = 1,
                       weight_bytes: float = 2.0, expert_bytes: float | None = None,
                       kv_bytes: float | None = None, embedding_rows: int | None = None,
                       tp: int = 1) -> ForwardCost:
    """Bytes and FLOPs of one forward of n_tokens per sequence (x batch) fed after cache_slots
    cache slots, on one of `tp` tensor-parallel devices.

    distinct_experts: per MoE layer, the experts the batch's routing selected (RoutingRecorder),
    one number for every layer, or None for expected_distinct_experts (uniform routing).
    weight_bytes: bytes per weight element (2: bf16, 4: fp32); expert_bytes: for the routed
    experts (1: FP8; default weight_bytes); kv_bytes: per cached element (default weight_bytes).
    embedding_rows: rows gathered by the embedding (default one per token: a forward fed ids;
    0 when fed embeddings). As the model does (model/attention.py), attention reads cache slots
    [0, cache_slots + n_tokens) and computes logits for every fed token.
    tp: attention heads, MLP / expert / shared-expert widths, vocabulary (lm_head) and KV heads
    are split over tp devices; router, norms and embedding are replicated; communication is not
    counted here."""
    c = config
    for name, value, low in (("n_tokens", n_tokens, 1), ("cache_slots", cache_slots, 0),
                             ("batch", batch, 1), ("tp", tp, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if c.num_key_value_heads % tp or c.num_attention_heads % tp:
        raise ValueError(f"tp ({tp}) must divide num_attention_heads ({c.num_attention_heads}) "
                         f"and num_key_value_heads ({c.num_key_value_heads})")
    expert_bytes = weight_bytes if expert_bytes is None else expert_bytes
    kv_bytes = weight_bytes if kv_bytes is None else kv_bytes
    tokens = batch * n_tokens
    rows = tokens if embedding_rows is None else embedding_rows
    n_layers, n_moe = c.num_hidden_layers, moe_layer_count(c)
    n_dense = n_layers - n_moe
    h, hd = c.hidden_size, c.head_dim
    q_dim, kv_dim = c.num_attention_heads * hd, c.num_key_value_heads * hd
    attn_params = (q_dim + 2 * kv_dim) * h + q_dim * h               # query_key_value + dense
    dense_params = 3 * h * c.intermediate_size                       # gate, up, down
    expert_params = 3 * h * c.moe_intermediate_size
    shared_params = expert_params * c.num_shared_experts
    router_params = c.num_experts * h
    experts = _per_layer_experts(c, distinct_experts, tokens)
    slots_read = cache_slots + n_tokens

    nbytes = {
        "attention": n_layers * attn_params * weight_bytes / tp,
        "dense_mlp": n_dense * dense_params * weight_bytes / tp,
        "experts": sum(experts) * expert_params * expert_bytes / tp,
        "shared_expert": n_moe * shared_params * weight_bytes / tp,
        # router weight in the model dtype, expert_bias float32
        "router": n_moe * (router_params * weight_bytes + c.num_experts * 4),
        # input + post-attention norms, q/k norms per layer, the final norm
        "norms": (n_layers * (2 * h + 2 * hd) + h) * weight_bytes,
        "lm_head": c.vocab_size * h * weight_bytes / tp,
        "embedding": min(rows, c.vocab_size) * h * weight_bytes,
        "kv_read": n_layers * 2 * batch * slots_read * kv_dim * kv_bytes / tp,
        "kv_write": n_layers * 2 * batch * n_tokens * kv_dim * kv_bytes / tp,
        "logits": tokens * c.vocab_size * weight_bytes / tp,
    }
    flops = {
        "attention": (n_layers * 2 * tokens * attn_params
                      + n_layers * 4 * batch * n_tokens * slots_read * q_dim) / tp,  # QK^T, PV
        "dense_mlp": n_dense * 2 * tokens * dense_params / tp,
        "experts": n_moe * 2 * tokens * c.num_experts_per_tok * expert_params / tp,
        "shared_expert": n_moe * 2 * tokens * shared_params / tp,
        "router": n_moe * 2 * tokens * router_params,
        "norms": 0.0, "lm_head": 2 * tokens * c.vocab_size * h / tp, "embedding": 0.0,
        "kv_read": 0.0, "kv_write": 0.0, "logits": 0.0,
    }
    return ForwardCost(bytes=nbytes, flops=flops)


def floor_ms(bytes: float, flops: float, bandwidth: float, flops_per_s: float) -> float:
    """The roofline floor of a forward: max(bytes / bandwidth [bytes/s], flops / flops_per_s)."""
    return 1e3 * max(bytes / bandwidth, flops / flops_per_s)


# ---- the routing a real forward selects ---------------------------------------------------------

class RoutingRecorder:
    """Inside `with RoutingRecorder(model) as rec:`, records for every forward the number of
    distinct experts each MoE layer's router selected over all rows of the batch (a forward hook
    on each moe.Router, whose forward returns (ids [N, k], weights)). rec.per_forward() -> one
    list per forward, in layer order: block_forward_cost's distinct_experts. Reading the count
    syncs a CUDA device: a measuring tool, not for timed runs."""

    def __init__(self, model):
        from dmax_ext.model.moe import Router
        self.routers = [m for m in model.modules() if isinstance(m, Router)]
        self.calls: list[int] = []
        self._handles = []

    def __enter__(self) -> "RoutingRecorder":
        self._handles = [r.register_forward_hook(self._record) for r in self.routers]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _record(self, module, inputs, output) -> None:
        self.calls.append(int(output[0].unique().numel()))

    def per_forward(self) -> list[list[int]]:
        n = len(self.routers)
        return [self.calls[i:i + n] for i in range(0, len(self.calls) - n + 1, n)]


def recorded_routing(preset: str, n_tokens: int, cache_slots: int, dtype: torch.dtype,
                     seed: int = 0) -> list[int]:
    """Distinct experts per MoE layer in one cached forward of n_tokens random ids after
    cache_slots slots, on random_model(preset) (random router weights: close to uniform)."""
    import dmax_ext
    model = dmax_ext.random_model(preset, dtype=dtype, seed=seed)
    cache = model.new_cache(1, cache_slots + n_tokens)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(model.config.vocab_size, (1, n_tokens), generator=generator)
    positions = cache_slots + torch.arange(n_tokens)[None]
    with torch.inference_mode(), RoutingRecorder(model) as recorder:
        model.forward_cached(cache, input_ids=ids, position_ids=positions, write_slot=cache_slots,
                             valid_from=torch.zeros(1, dtype=torch.int64), block_length=n_tokens)
    return recorder.per_forward()[0]


# ---- CLI ----------------------------------------------------------------------------------------

def format_machine(m: MachineRoofline) -> str:
    lines = [f"threads {m.threads}  load average {' '.join(f'{x:.2f}' for x in m.load_average)}",
             f"copy bandwidth: {m.copy_gbps:.1f} GB/s (read + write)",
             f"{'matmul GFLOP/s':<16}" + "".join(f"{label} {tuple(shape)}".rjust(26)
                                                 for label, shape in m.shapes.items())]
    for dtype, by_shape in m.matmul_gflops.items():
        lines.append(f"{dtype:<16}" + "".join(f"{v:26.1f}" for v in by_shape.values()))
    return "\n".join(lines)


def format_cost(cost: ForwardCost) -> str:
    lines = [f"{'part':<14}{'MB':>12}{'GFLOP':>10}"]
    for part in COST_PARTS:
        lines.append(f"{part:<14}{cost.bytes[part] / 1e6:12.2f}{cost.flops[part] / 1e9:10.3f}")
    lines.append(f"{'total':<14}{cost.total_bytes / 1e6:12.2f}{cost.total_flops / 1e9:10.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="llada2-small")
    p.add_argument("--dtype", choices=[dtype_name(d) for d in MATMUL_DTYPES], default="float32",
                   help="model dtype of the cost and floor (float32: tps.py's CPU default)")
    p.add_argument("--tokens", type=int, default=32, help="tokens fed per forward (a block)")
    p.add_argument("--cache-slots", type=int, default=512, help="cache slots before the block")
    p.add_argument("--record-routing", action="store_true",
                   help="distinct experts from a forward of random_model(preset) (else uniform)")
    p.add_argument("--no-measure", dest="measure", action="store_false",
                   help="only the cost (no machine measurement)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads first (default: as is)")
    p.add_argument("--quick", action="store_true", help="256 MiB copy, 3 repeats")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config, dtype = preset_config(args.preset), getattr(torch, args.dtype)
    print(f"torch {torch.__version__}  cpu capability {torch.backends.cpu.get_cpu_capability()}")
    if args.record_routing:
        distinct = recorded_routing(args.preset, args.tokens, args.cache_slots, dtype)
        print(f"routing: distinct experts per MoE layer (recorded) {distinct}")
    else:
        distinct = None
        print(f"routing: uniform, E[distinct experts] per MoE layer = "
              f"{expected_distinct_experts(config, args.tokens):.1f} of {config.num_experts}")
    cost = block_forward_cost(config, args.tokens, args.cache_slots, distinct,
                              weight_bytes=dtype.itemsize)
    print(f"one forward of {args.preset} ({args.dtype}), {args.tokens} tokens after "
          f"{args.cache_slots} cache slots:")
    print(format_cost(cost))
    if args.measure:
        machine = measure_machine(config, copy_bytes=COPY_BYTES >> 2 if args.quick else COPY_BYTES,
                                  repeats=3 if args.quick else 5, block_length=args.tokens)
        print(format_machine(machine))
        bytes_ms = 1e3 * cost.total_bytes / machine.bytes_per_s
        for shape in (f"small-{args.tokens}", "peak", None):
            flops_per_s = machine.flops_per_s(dtype, shape)
            floor = floor_ms(cost.total_bytes, cost.total_flops, machine.bytes_per_s, flops_per_s)
            print(f"floor with {shape or 'the fastest'} matmul throughput: {floor:.2f} ms (bytes "
                  f"{bytes_ms:.2f} ms, FLOPs {1e3 * cost.total_flops / flops_per_s:.2f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
