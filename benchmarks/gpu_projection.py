"""Writes the "GPU projections" section of docs/PERFORMANCE.md: the bytes one block forward of
LLaDA2.0-mini must read on an H100 / H200, the time that takes at the device's memory bandwidth,
the tokens per second that implies at the paper's tokens per forward (TPF), and what one
CUDA-graph step of our decoder launches. No GPU is involved: every figure is a projection.

    python benchmarks/gpu_projection.py            # rewrite the section between the markers
    python benchmarks/gpu_projection.py --print    # print the section instead

The model's sizes come from the "llada2-mini" preset (dmax_ext.model.presets), the bytes and
FLOPs from roofline.block_forward_cost, the op counts from step_ops.count_step_ops (a trace of the
real step on the "tiny" preset, whose code paths are llada2-mini's).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import roofline  # noqa: E402  (puts python/ on sys.path)
import step_ops  # noqa: E402
from dmax_ext.model.presets import preset_config  # noqa: E402

DOC = roofline.REPO / "docs" / "PERFORMANCE.md"
BEGIN, END = "<!-- gpu-projections:begin -->", "<!-- gpu-projections:end -->"
DOC_HEADER = """# Performance log

The project's measurement log. Each entry: date, machine, command, figures, what changed since the
previous entry; newest first. GPU figures are projections only (no GPU has been measured), written
by `benchmarks/gpu_projection.py` into the section between the markers at the end.
"""

PRESET = "llada2-mini"
BLOCK = 32                    # block length of the paper's evaluation (SPEC section 3)
CACHE_SLOTS = (512, 2048)     # cache lengths the block's queries attend to
WEIGHT_BYTES = 2              # bf16 (config torch_dtype)
ACHIEVABLE = 0.85             # assumed fraction of peak HBM bandwidth weight streaming reaches
# Non-tensor FP32 throughput (H100 SXM / H200 datasheets: 67 TFLOP/s) and the fraction of it the
# CUDA-core attention kernel may reach: it reads shared memory for every multiply-add
# (csrc/kernels/block_attention.cuh; an estimate, not measured).
FP32_CUDA_CORE_FLOPS = 67e12
ASSUMED_CUDA_CORE_ATTENTION_SHARE = 0.2


@dataclass(frozen=True)
class Device:
    name: str
    peak_bytes_per_s: float
    bf16_dense_flops: float
    source: str


DEVICES = (
    Device("H100 SXM", 3.35e12, 989e12,
           "NVIDIA H100 datasheet, SXM5: 80 GB HBM3 at 3.35 TB/s, 989 dense BF16 TFLOP/s"),
    Device("H200", 4.8e12, 989e12,
           "NVIDIA H200 datasheet: 141 GB HBM3e at 4.8 TB/s, same compute as H100 SXM"),
)
EXPERT_FORMATS = (("bf16", 2.0), ("FP8", 1.0))   # bytes per routed-expert weight
TPS = (1, 2)
# SPEC section 6 (the paper): TPF per benchmark and throughput.
PAPER_TPF = (("DMax GSM8K", 5.47), ("DMax MBPP", 5.86), ("baseline GSM8K", 2.04),
             ("baseline MBPP", 2.71))
PAPER_TOKENS_PER_S, PAPER_SETUP = 1338, "two H200, tensor parallel 2, batch 1"
# Assumptions for what the bandwidth floor leaves out (order of magnitude, not measured).
ASSUMED_US_PER_GRAPH_KERNEL = 2.0      # launch gap + minimal duration of a small kernel in a graph
ASSUMED_US_PER_EAGER_OP = 5.0          # PyTorch eager dispatch + launch, CPU side
ASSUMED_US_PER_ALLREDUCE = 10.0        # small-message all-reduce over NVLink (2 GPUs)
ASSUMED_MATMUL_SHARE = 0.5             # of the dense BF16 peak, a batched forward's GEMMs
SCHEDULE_BATCHES = (1, 2, 4, 8, 16, 32, 64)


def costs(config, tp: int, expert_bytes: float, cache_slots: int) -> dict:
    """The two kinds of forward of a block (SPEC section 2): "later" = one block fed as hybrid
    embeddings (no embedding rows gathered by the model); "first" = the previous and the current
    block fed as ids (2 x BLOCK tokens), after the same committed cache minus one block."""
    common = dict(weight_bytes=WEIGHT_BYTES, expert_bytes=expert_bytes, tp=tp)
    cost = roofline.block_forward_cost
    return {"later": cost(config, BLOCK, cache_slots, embedding_rows=0, **common),
            "first": cost(config, 2 * BLOCK, cache_slots - BLOCK, **common)}


def ms(nbytes: float, device: Device) -> float:
    return 1e3 * nbytes / (ACHIEVABLE * device.peak_bytes_per_s)


def block_ms(first_ms: float, later_ms: float, tpf: float) -> float:
    """A block of BLOCK tokens takes BLOCK / TPF forwards: its first step and the rest later."""
    return first_ms + (BLOCK / tpf - 1) * later_ms


def tokens_per_s(first_ms: float, later_ms: float, tpf: float) -> float:
    return BLOCK / block_ms(first_ms, later_ms, tpf) * 1e3


def _mb(x: float) -> str:
    return f"{x / 1e6:,.1f}"


def assumptions(config) -> list[str]:
    c, n_moe = config, roofline.moe_layer_count(config)
    expert_params = 3 * c.hidden_size * c.moe_intermediate_size
    lines = ["### Sources and assumptions", "",
             f"- Model: preset `{PRESET}` (LLaDA2Config): {c.num_hidden_layers} layers "
             f"({c.num_hidden_layers - n_moe} dense, {n_moe} MoE), hidden {c.hidden_size}, "
             f"{c.num_attention_heads} query / {c.num_key_value_heads} KV heads of {c.head_dim}, "
             f"dense MLP {c.intermediate_size}, {c.num_experts} experts of "
             f"{c.moe_intermediate_size} "
             f"(3 x {c.hidden_size} x {c.moe_intermediate_size} = {expert_params:,} params each), "
             f"top-{c.num_experts_per_tok}, {c.num_shared_experts} shared expert, vocabulary "
             f"{c.vocab_size:,}. Weights, activations and KV cache bf16 ({WEIGHT_BYTES} B).",
             "- Bandwidth: " + "; ".join(f"{d.name}: {d.source}" for d in DEVICES)
             + f". Projected at **{ACHIEVABLE:.0%} of peak** (assumed: what well-tuned "
             "weight-streaming kernels reach on HBM; not measured).",
             "- FP8 experts: routed experts at 1 B per weight (block scales, ~4 B per 128 x 128 "
             "block, ignored); everything else bf16.",
             "- Counting (`roofline.block_forward_cost`): each weight a forward uses is read once "
             "(attention, dense MLP, the distinct routed experts, shared expert, router + fp32 "
             "bias, norms, lm_head), the embedding rows gathered, the KV cache read over slots "
             "[0, cache + fed tokens) as the model's attention does and written for the fed "
             "tokens, the logits written. Activations between kernels are not counted.",
             "- TP 2: model/tensor_parallel.py's layout: attention and KV heads, the dense "
             "MLP's, shared expert's and each routed expert's widths, and the lm_head's "
             "vocabulary split over the GPUs (bytes per GPU = half); router and norms "
             "replicated (the embedding is split too; its gathered rows are negligible). "
             "Communication is not in the floor (see below). That code is tested on CPU "
             "processes (gloo), not on GPUs.",
             f"- TPF: the paper's (SPEC section 6): "
             + ", ".join(f"{name} {tpf}" for name, tpf in PAPER_TPF)
             + f". A block of {BLOCK} tokens takes {BLOCK}/TPF forwards: one first step "
             f"({2 * BLOCK} tokens, SPEC section 2) and {BLOCK}/TPF - 1 later steps ({BLOCK} "
             "tokens). The prompt's prefill forward is not modelled.", ""]
    return lines


def distinct_section(config) -> list[str]:
    e, k = config.num_experts, config.num_experts_per_tok
    lines = ["### Distinct experts per MoE layer (uniform routing assumed)", "",
             f"E[distinct] = E (1 - (1 - k/E)^T) with E = {e}, k = {k}: every token picks each "
             "expert with probability k/E independently of the others.", "",
             "| tokens T | E[distinct] | of E | skew scenario: uniform over E/2 | over E/4 |",
             "|---|---|---|---|---|"]
    for t in (BLOCK, 2 * BLOCK):
        d = roofline.expected_distinct_experts(config, t)
        half = roofline.expected_distinct_experts(config, t, e // 2)
        quarter = roofline.expected_distinct_experts(config, t, e // 4)
        lines.append(f"| {t} | {e} (1 - (1 - {k}/{e})^{t}) = **{d:.1f}** | {d / e:.0%} | "
                     f"{half:.1f} | {quarter:.1f} |")
    lines += ["", "Uniform is the upper bound: for given per-expert probabilities p_e (summing to "
              "k) the expectation sum_e 1 - (1 - p_e)^T is largest when they are equal. The "
              "router's expert bias balances load over a corpus, but the tokens of one block are "
              "correlated (same text, neighbouring positions) and route alike, so a real block "
              "touches fewer experts; the skew columns show how the expert bytes would shrink. "
              "`roofline.RoutingRecorder` measures the real count from a forward of a real "
              "checkpoint (none was available here).", ""]
    return lines


def bytes_section(config) -> list[str]:
    later = {s: costs(config, 1, WEIGHT_BYTES, s)["later"] for s in CACHE_SLOTS}
    first = costs(config, 1, WEIGHT_BYTES, CACHE_SLOTS[-1])["first"]
    fp8 = costs(config, 1, 1.0, CACHE_SLOTS[-1])["later"]
    cols = [(f"later step, cache {s}", later[s]) for s in CACHE_SLOTS]
    cols += [(f"first step ({2 * BLOCK} tok), cache {CACHE_SLOTS[-1]}", first),
             (f"later, cache {CACHE_SLOTS[-1]}, FP8 experts", fp8)]
    c, n_moe = config, roofline.moe_layer_count(config)
    d32 = roofline.expected_distinct_experts(config, BLOCK)
    kv_row = 2 * c.num_key_value_heads * c.head_dim * WEIGHT_BYTES
    how = {"attention": f"{c.num_hidden_layers} x ((nh + 2 nkv) hd + nh hd) x H x 2 B",
           "dense_mlp": f"{c.num_hidden_layers - n_moe} x 3 x H x {c.intermediate_size} x 2 B",
           "experts": f"{n_moe} x E[distinct] ({d32:.1f} at {BLOCK} tok) x 3 x H x "
                      f"{c.moe_intermediate_size} x 2 B",
           "shared_expert": f"{n_moe} x 3 x H x {c.moe_intermediate_size * c.num_shared_experts}"
                            " x 2 B",
           "router": f"{n_moe} x ({c.num_experts} x H x 2 B + {c.num_experts} x 4 B)",
           "norms": "(2 H + 2 hd) per layer + H", "lm_head": f"{c.vocab_size} x H x 2 B",
           "embedding": "fed ids x H x 2 B (later steps: fed embeddings)",
           "kv_read": f"{c.num_hidden_layers} layers x (cache + fed) x {kv_row} B",
           "kv_write": f"{c.num_hidden_layers} layers x fed x {kv_row} B",
           "logits": f"fed x {c.vocab_size} x 2 B"}
    lines = ["### Bytes one block forward must read or write (one GPU, TP 1; MB = 1e6 B)", "",
             "| part | " + " | ".join(name for name, _ in cols) + " | arithmetic |",
             "|---" * (len(cols) + 2) + "|"]
    for part in roofline.COST_PARTS:
        lines.append(f"| {part} | " + " | ".join(_mb(cost.bytes[part]) for _, cost in cols)
                     + f" | {how[part]} |")
    lines.append("| **total** | " + " | ".join(f"**{_mb(cost.total_bytes)}**" for _, cost in cols)
                 + " | |")
    lines.append("| GFLOP | " + " | ".join(f"{cost.total_flops / 1e9:,.1f}" for _, cost in cols)
                 + " | 2 per multiply-add |")
    small, large = later[CACHE_SLOTS[0]], later[CACHE_SLOTS[-1]]
    one_token = roofline.block_forward_cost(config, 1, 0, c.num_experts_per_tok,
                                            weight_bytes=WEIGHT_BYTES)
    lines += ["", f"The routed experts are {small.bytes['experts'] / small.total_bytes:.0%} of a "
              f"later step's bytes: a {BLOCK}-token block touches {d32:.0f} of {c.num_experts} "
              "experts per layer, so a block forward reads most of the model, where one token "
              f"alone would read {one_token.total_bytes / 1e9:.2f} GB ({c.num_experts_per_tok} "
              "experts per layer). The KV cache is small next to that (cache "
              f"{CACHE_SLOTS[0]} vs {CACHE_SLOTS[-1]} changes the total by "
              f"{large.total_bytes / small.total_bytes - 1:.1%}).", ""]
    return lines


def projection_rows(config, cache_slots: int) -> list[tuple]:
    rows = []
    for device in DEVICES:
        for fmt, expert_bytes in EXPERT_FORMATS:
            for tp in TPS:
                cost = costs(config, tp, expert_bytes, cache_slots)
                rows.append((device, fmt, tp, cost["later"], cost["first"],
                             ms(cost["later"].total_bytes, device),
                             ms(cost["first"].total_bytes, device)))
    return rows


def projection_section(config) -> list[str]:
    slots = CACHE_SLOTS[0]
    rows = projection_rows(config, slots)
    lines = [f"### Projected forward time and tokens/s (cache {slots}; bandwidth floor only)", "",
             "| GPU | experts | TP | GB/GPU later | later ms | first ms | "
             + " | ".join(f"tok/s at {name} TPF {tpf}" for name, tpf in PAPER_TPF) + " |",
             "|---" * (6 + len(PAPER_TPF)) + "|"]
    for device, fmt, tp, later, first, later_ms, first_ms in rows:
        lines.append(f"| {device.name} | {fmt} | {tp} | {later.total_bytes / 1e9:.2f} | "
                     f"{later_ms:.2f} | {first_ms:.2f} | "
                     + " | ".join(f"{tokens_per_s(first_ms, later_ms, tpf):,.0f}"
                                  for _, tpf in PAPER_TPF) + " |")
    device, fmt, tp, later, first, later_ms, first_ms = next(
        r for r in rows if r[0].name == "H200" and r[1] == "bf16" and r[2] == 2)
    tpf = PAPER_TPF[0][1]
    bw = ACHIEVABLE * device.peak_bytes_per_s / 1e12
    peak = device.peak_bytes_per_s / 1e12
    lines += ["", f"Arithmetic, {device.name}, {fmt} experts, TP {tp}: later step "
              f"{later.total_bytes / 1e9:.3f} GB / ({ACHIEVABLE} x {peak} TB/s = {bw:.2f} TB/s) = "
              f"{later_ms:.2f} ms; first step {first.total_bytes / 1e9:.3f} GB -> {first_ms:.2f} "
              f"ms; at TPF {tpf} a block takes {BLOCK}/{tpf} = {BLOCK / tpf:.2f} forwards = "
              f"{first_ms:.2f} + {BLOCK / tpf - 1:.2f} x {later_ms:.2f} = "
              f"{block_ms(first_ms, later_ms, tpf):.2f} ms for {BLOCK} tokens -> "
              f"{tokens_per_s(first_ms, later_ms, tpf):,.0f} tokens/s (projection).", ""]
    at_2048 = {(r[0].name, r[1], r[2]): tokens_per_s(r[6], r[5], tpf)
               for r in projection_rows(config, CACHE_SLOTS[-1])}
    floor_dmax = [tokens_per_s(first_ms, later_ms, t) for _, t in PAPER_TPF[:2]]
    lines += [f"At cache {CACHE_SLOTS[-1]} the same row gives "
              f"{at_2048[(device.name, fmt, tp)]:,.0f} tokens/s at TPF {tpf}.", "",
              "### Compared with the paper", "",
              f"The paper reports {PAPER_TOKENS_PER_S:,} tokens/s averaged over benchmarks "
              f"({PAPER_SETUP}). Our bandwidth floor for that setup ({device.name}, TP {tp}, "
              f"bf16) is {floor_dmax[0]:,.0f} - {floor_dmax[1]:,.0f} tokens/s at TPF "
              f"{PAPER_TPF[0][1]} - {PAPER_TPF[1][1]}: the paper's figure is "
              f"{PAPER_TOKENS_PER_S / floor_dmax[1]:.0%} - {PAPER_TOKENS_PER_S / floor_dmax[0]:.0%}"
              " of it, plausible for a real engine that pays the overheads listed below. Our "
              "own GPU throughput is unmeasured.", ""]
    return lines


def forward_cost(config, tp: int, batch: int, n_tokens: int, cache_slots: int, n_logits: int,
                 embedding_rows: int) -> tuple[float, float]:
    """(bytes, FLOPs) per GPU of one forward of batch rows x n_tokens fed after cache_slots
    slots, computing logits for the last n_logits tokens of each row only."""
    c = roofline.block_forward_cost(config, n_tokens, cache_slots, batch=batch,
                                    embedding_rows=embedding_rows, weight_bytes=WEIGHT_BYTES,
                                    tp=tp)
    unread = 1 - n_logits / n_tokens
    return (c.total_bytes - c.bytes["logits"] * unread,
            c.total_flops - c.flops["lm_head"] * unread)


def forward_ms(nbytes: float, flops: float, device: Device) -> float:
    """The bandwidth floor, or the arithmetic at the assumed share of the BF16 peak if longer."""
    return 1e3 * max(nbytes / (ACHIEVABLE * device.peak_bytes_per_s),
                     flops / (ASSUMED_MATMUL_SHARE * device.bf16_dense_flops))


def decode_ms(shapes, device_name: str = "H200", tp: int = 2) -> float:
    """The projected time of a decode's forwards (block_forward.ForwardShape: rows, tokens fed,
    cache slots, logits), each costed as the same forward of PRESET (llada2-mini) on the device
    (forward_cost / forward_ms): a decode's step counts, measured on any model, with the real
    model's bytes."""
    config, device = preset_config(PRESET), next(d for d in DEVICES if d.name == device_name)
    total = 0.0
    for s in shapes:
        # a count this small either way: SPD's later steps gather no embedding rows
        total += forward_ms(*forward_cost(config, tp, s.batch, s.n_tokens, s.cache_slots,
                                          s.n_logits, 0), device)
    return total


def schedule_forward(config, tp: int, batch: int, cache_slots: int, rolling: bool):
    """(bytes, FLOPs) per GPU of one batched forward: lockstep's later step (L tokens a row, from
    embeddings) or the rolling schedule's step (2L a row: the previous block from ids,
    re-committed, and the current one; logits of the current block only)."""
    if not rolling:
        return forward_cost(config, tp, batch, BLOCK, cache_slots, BLOCK, 0)
    return forward_cost(config, tp, batch, 2 * BLOCK, cache_slots - BLOCK, BLOCK, batch * BLOCK)


def schedule_section(config) -> list[str]:
    """Batched forwards of the two schedules (decoding/engine.py, decoding/rolling.py)."""
    from dmax_ext.decoding.params import ROLLING_MAX_BATCH
    device, tp, slots = next(d for d in DEVICES if d.name == "H200"), 2, CACHE_SLOTS[0]
    lines = [f"### Batches: one forward of each schedule ({device.name}, bf16, TP {tp}, cache "
             f"{slots})", "",
             "A batch decode's time is its forwards times their cost. Lockstep (engine.py) runs, "
             "per block, the slowest row's steps; rolling (rolling.py) starts each row's next "
             "block as soon as its block converges, so it runs the longest sequence's own "
             "forwards, but a forward where some row starts a block feeds 2L tokens a row (the "
             "previous blocks, committed or re-committed; where none does, a later step). Time "
             "per forward = max(bytes / (" f"{ACHIEVABLE} x bandwidth), FLOPs "
             f"/ ({ASSUMED_MATMUL_SHARE} x the dense BF16 peak)) (the share of peak is assumed):",
             "", "| batch | lockstep later step: GB / GFLOP / ms | rolling step: GB / GFLOP / ms "
             "| rolling / lockstep time per forward |", "|---|---|---|---|"]
    ratios = {}
    for batch in SCHEDULE_BATCHES:
        cells = []
        for rolling in (False, True):
            nbytes, flops = schedule_forward(config, tp, batch, slots, rolling)
            cells.append((nbytes, flops, forward_ms(nbytes, flops, device)))
        ratios[batch] = cells[1][2] / cells[0][2]
        lines.append(f"| {batch} | " + " | ".join(f"{b / 1e9:.2f} / {f / 1e9:,.0f} / {t:.2f}"
                                                  for b, f, t in cells)
                     + f" | {ratios[batch]:.2f} |")
    small = [b for b in SCHEDULE_BATCHES if 1 < b <= ROLLING_MAX_BATCH]
    lines += ["", f"From 2 to {ROLLING_MAX_BATCH} rows a rolling forward costs "
              f"{min(ratios[b] for b in small):.2f} - {max(ratios[b] for b in small):.2f}x "
              "lockstep's later step: both read nearly every expert (a 32-token row already "
              "touches 64% of them), and the doubled arithmetic stays under the bandwidth time. "
              "So rolling wins wherever it saves more forwards than that, and decode's scheduler "
              f"\"auto\" takes it for CUDA batches of 2 to {ROLLING_MAX_BATCH} "
              "(decoding/params.py ROLLING_MAX_BATCH). Past that the forward turns "
              f"compute-bound ({ratios[SCHEDULE_BATCHES[-1]]:.2f}x at batch "
              f"{SCHEDULE_BATCHES[-1]}). At batch 1 there is nothing to save (rolling = "
              "lockstep's forwards, each dearer). The forwards each schedule runs depend on the "
              "model's block step counts: docs/PERFORMANCE.md's log has them measured on the "
              "synthetic llada2-small workload (a count, not a time: the same on any machine).",
              ""]
    return lines


def attention_compute_line(config, device: Device) -> str:
    """The attention's products over a long cache, on tensor cores (block_attention_tc.cuh) and
    as the CUDA-core kernel would run them."""
    slots, tp = CACHE_SLOTS[-1], 2

    def over_cache(batch: int) -> float:  # QK^T and PV over the cached slots, per GPU
        cost = roofline.block_forward_cost
        return (cost(config, BLOCK, slots, batch=batch, tp=tp).flops["attention"]
                - cost(config, BLOCK, 0, batch=batch, tp=tp).flops["attention"])

    cuda_core = ASSUMED_CUDA_CORE_ATTENTION_SHARE * FP32_CUDA_CORE_FLOPS
    later = ms(costs(config, tp, WEIGHT_BYTES, slots)["later"].total_bytes, device)
    one, eight = over_cache(1), over_cache(8)
    return (f"- Attention: a later step's scores and weighted sums over a cache of {slots:,} "
            f"slots are {one / 1e9:.1f} GFLOP per GPU at TP {tp} ({eight / 1e9:.1f} at batch 8). "
            "In 16-bit they run on tensor cores (`block_attention_tc.cuh`: three products where "
            "one would do, each probability in two 16-bit terms), "
            f"{1e3 * 3 / 2 * one / device.bf16_dense_flops:.3f} ms at the dense BF16 peak, "
            f"{1e4 * 3 / 2 * one / device.bf16_dense_flops:.2f} ms at a tenth of it. On CUDA "
            "cores at "
            f"an assumed {ASSUMED_CUDA_CORE_ATTENTION_SHARE:.0%} of the "
            f"{FP32_CUDA_CORE_FLOPS / 1e12:.0f} FP32 TFLOP/s (`block_attention.cuh`, the float32 "
            f"path) they would take {1e3 * one / cuda_core:.2f} ms "
            f"({1e3 * one / cuda_core / later:.0%} of the {later:.2f} ms an {device.name} at "
            f"TP {tp} reads a later step in; {1e3 * eight / cuda_core:.1f} ms at batch 8).")


def overheads_section(config, later_step, eager_step) -> list[str]:
    c = config
    n_moe = roofline.moe_layer_count(c)
    flops = costs(c, 2, WEIGHT_BYTES, CACHE_SLOTS[0])["later"].total_flops
    h200 = DEVICES[-1]
    kernels = sum(step_ops.scaled_counts(later_step, c).values())
    eager = sum(step_ops.scaled_counts(eager_step, c).values())
    comm = 2 * c.num_hidden_layers
    slots = CACHE_SLOTS[0]
    span_cost = {n: costs(c, 1, WEIGHT_BYTES, n)["later"].total_bytes for n in (slots, 2 * slots)}
    h200_tp2_later = ms(costs(c, 2, WEIGHT_BYTES, slots)["later"].total_bytes, h200)
    return ["### Beyond the bandwidth floor (not in the figures above)", "",
            f"- Compute: a later step is {flops / 1e9:.1f} GFLOP per GPU at TP 2; at "
            f"{h200.bf16_dense_flops / 1e12:.0f} dense BF16 TFLOP/s that is "
            f"{1e3 * flops / h200.bf16_dense_flops:.3f} ms, far below the bandwidth time: "
            "the forward is memory-bound (if its matmuls reach even 10% of peak at 32 rows).",
            attention_compute_line(c, h200),
            f"- Kernel count: one later step dispatches about {kernels:,} data-moving ops for "
            f"{PRESET} (next section); at an assumed {ASSUMED_US_PER_GRAPH_KERNEL} us per small "
            f"kernel inside a graph that is ~{kernels * ASSUMED_US_PER_GRAPH_KERNEL / 1e3:.1f} ms "
            f"per step, {kernels * ASSUMED_US_PER_GRAPH_KERNEL / 1e3 / h200_tp2_later:.0%} of "
            f"the {h200_tp2_later:.2f} ms an {h200.name} at TP 2 takes to read a later step "
            "(the launches overlap the reads only in part). The norms (the post-attention one "
            "with its residual add), the q|k prologue with the KV cache writes, the attention, "
            "SwiGLU, the router's selection, the MoE layer's sort and its weighted sum (with "
            "the shared expert's output and the layer's residual add) and the per-forward "
            "rotary and mask tables run as one kernel each (csrc/kernels/: rms_norm, "
            "add_rms_norm, qk_norm_rotary_write_kv, block_attention, swiglu, moe_route, "
            "moe_dispatch, moe_combine, step_tables); block_attention adds a second launch "
            "(the merge of its key splits) where the rows alone would not fill the device, as "
            f"at batch 1: ~{c.num_hidden_layers} more. What is left is mostly GEMMs, the "
            "router's float32 cast and the SPD step's small ops (next section).",
            f"- Eager steps: the first generated block's first step (once per decode: it has "
            "no previous block to commit, so other shapes) and the step run just before each "
            f"capture dispatch ~{eager:,} ops from Python (a first step with the ops wrappers); "
            f"at an assumed {ASSUMED_US_PER_EAGER_OP} us each that is "
            f"~{eager * ASSUMED_US_PER_EAGER_OP / 1e3:.0f} ms of CPU time per eager step. "
            "Graph captures: one per batch size, kind of step (first, later) and key-span "
            f"bucket (next section), not one per block: at most 2 (log2(S / {BLOCK}) + 1) per "
            "batch size for a cache of S slots (lockstep; the rolling schedule has two kinds of "
            "step at one slot: one graph of each for a whole decode, sequences admitted in "
            "finished ones' places).",
            f"- Key-span buckets: a replayed step reads up to twice the keys it needs; reading "
            f"{2 * slots} slots instead of {slots} adds "
            f"{span_cost[2 * slots] / span_cost[slots] - 1:.1%} to a later step's bytes.",
            f"- TP 2 communication: {comm} all-reduces per forward (after attention's dense and "
            f"after each MLP) of [{BLOCK}, {c.hidden_size}] bf16 "
            f"({BLOCK * c.hidden_size * 2 // 1024} KiB); at an assumed {ASSUMED_US_PER_ALLREDUCE}"
            " us each, "
            f"~{comm * ASSUMED_US_PER_ALLREDUCE / 1e3:.1f} ms per forward; the logits stay "
            "split by vocabulary (decoding/tensor_parallel_ops.py): the SPD step adds one small "
            "all_gather of per-position statistics and one all_reduce of the hybrid "
            f"embeddings' sums ([{BLOCK}, {c.hidden_size} + 1] fp32).", ""]




def step_section(config, later_step, first_step, eager_step) -> list[str]:
    c = config
    later, first = step_ops.scaled_counts(later_step, c), step_ops.scaled_counts(first_step, c)
    per_unit = step_ops.per_unit_counts(later_step)
    units = step_ops.section_units(c)
    n_moe = roofline.moe_layer_count(c)
    moe_syncs = later_step.syncs.get("moe", 0) // step_ops.section_units(later_step.config)["moe"]
    eager_syncs = eager_step.syncs.get("apply_step", 0)
    lines = [f"### What one step of our decoder launches ({PRESET}; traced, not timed)", "",
             "From `python/dmax_ext/decoding/` (engine.py, step.py, cuda_graph.py, backends.py) "
             "and `model/`, as of this generation. Per block: step 0 (`forward_first`: the "
             f"previous and current block, {2 * BLOCK} tokens from ids, which also commits the "
             "previous block's K/V) and the later steps (`forward_block`: the block's hybrid "
             "embeddings) replay CUDA graphs captured once per batch size, kind of step and key "
             "span: the attention reads slots [0, span), span the smallest power-of-two "
             f"multiple of the block length ({BLOCK}) covering the block, capped at the cache, "
             "the keys past the block masked; the write slot is a device tensor the runner "
             "fills (`fill_`) when it changes (once a block), so one graph serves every block of "
             "its span. "
             "The first step of a kind at a new span runs eagerly on a side stream and is "
             "captured; every other step is `graph.replay()`. The first generated block's "
             "first step runs eagerly (no previous block: once per decode). A compaction (a "
             "sequence finished) drops the graphs: new buffers. (That is the lockstep schedule, "
             "traced below; a rolling step, `forward_rolling`, runs a first step's ops give or "
             "take one: the previous block's ids embedded and joined to the current block's "
             "embeddings, its positions clamped.)", "",
             "Ops counted by `benchmarks/step_ops.py` (a TorchDispatchMode trace of the real "
             "step on the `tiny` preset, bf16, the CUDA MoE path `grouped`, scaled to "
             f"{PRESET}'s layers; each op is at least one kernel on CUDA; views and no-op casts "
             "excluded):", "",
             "| section | ops per unit | units per forward | ops per later step | what |",
             "|---|---|---|---|---|"]
    what = {
        "attention": "qkv GEMM; one kernel normalizes and rotates the q and k heads and "
                     "writes the keys and values into the static cache at the device write "
                     "slot (`dmax.qk_norm_rotary_write_kv`: per-head RMSNorm in fp32, partial "
                     "rotary, no `index_put_`); the attention over the key span [0, span) as "
                     "one op, `dmax.block_attention` (in 16-bit on tensor cores; float32 online "
                     "softmax, GQA, the bool "
                     "mask read in place, the output in the layout the dense GEMM reads; the "
                     "keys split over blocks where the rows alone would not fill the device, "
                     "then a second launch merges the splits), where torch's SDPA, given this "
                     "call's bool mask and grouped heads, takes its math path (FlashAttention "
                     "takes no mask and memory-efficient attention no grouped heads: PyTorch's "
                     "sdp_utils.cpp; cuDNN attention, which would, comes after math in the "
                     "default order, pytorch/pytorch#138907; not checked on a device): the "
                     "keys and values repeated per head, two batched products, the mask, the "
                     "softmax, then a transpose copy, one op each in a CUDA trace where the CPU "
                     "trace saw SDPA as one; dense GEMM",
        "residual_norms": "the layer's input RMSNorm (`dmax.rms_norm`), the residual add "
                          "after the attention and the post-attention RMSNorm as one kernel "
                          "(`dmax.add_rms_norm`); the residual add after the MLP is the MoE "
                          "layer's `dmax.moe_combine` (below), a torch add after the dense MLP",
        "moe": "router GEMM in fp32 (activations cast; the fp32 weight a copy kept with the "
               "parameter); the route as one kernel (`dmax.moe_route`: sigmoid, bias, group "
               "top-2 sums, top-4 groups, top-8, normalize, scale); the routed entries sorted "
               "by expert as one kernel (`dmax.moe_dispatch`: a stable counting sort in one "
               "block, the rows' tokens, the inverse permutation, int32 offsets, on the "
               "device), row gather, two `torch._grouped_mm` (gate and up fused, then down) "
               "around `dmax.swiglu`, the weighted sum back per token in fp32 plus the shared "
               "expert's output plus the layer's residual as one kernel (`dmax.moe_combine`); "
               "shared expert: gate+up GEMM over stacked weights, `dmax.swiglu`, down GEMM",
        "dense_mlp": "gate+up GEMM over stacked weights, `dmax.swiglu`, down GEMM, the "
                     "residual add (layer 0)",
        "final_norm": "the final RMSNorm (`dmax.rms_norm`)",
        "other": "the fed slots, the rotary cos/sin of the positions and the cached "
                 "attention mask, from the write-slot tensor on the device, as one kernel "
                 "(`dmax.step_tables`), per forward",
        "lm_head": "one GEMM over all fed tokens",
        "embedding": "embedding gather (first step only: later steps feed embeddings)",
        "apply_step": "logits_stats (one CUDA block per position, <= 512 threads, one pass over "
                      "its V logits), promote and spd_update (one CUDA block per sequence), "
                      "hybrid_embed (one CUDA block per position: k + 1 embedding rows) and "
                      "~7 elementwise ops (live mask, where, copy_, done or converged, step + 1)",
    }
    for section in ("attention", "moe", "dense_mlp", "residual_norms", "final_norm", "other",
                    "lm_head", "apply_step"):
        lines.append(f"| {section} | {per_unit[section]:.0f} | {units.get(section, 1)} | "
                     f"{later[section]:,} | {what[section]} |")
    lines.append(f"| **total** | | | **{sum(later.values()):,}** | a block's first step "
                 f"(also a graph): {sum(first.values()):,} (the embedding gather and the two "
                 "blocks' ids and positions concatenated; apply_step without the converged "
                 "rows' masks) |")
    lines += ["", "Host synchronizations:", "",
              "- Every step: one, the engine reading the convergence flags "
              "(`running.done.tolist()` in `_run_block`) to decide whether the block goes on "
              "and for which rows.",
              "- Every block: the block's ids to the host (`state.ids.tolist()`, eos and "
              "collection), the block starts copied to the device (`start_block`), and a "
              "cache compaction (`KVCache.select`) when a sequence finishes.",
              f"- Eager steps only: the ops wrappers' value checks ({eager_syncs} reads of a "
              "tensor value per step in the trace: id range and NaN checks); a captured step "
              "calls `torch.ops.dmax.*` directly.",
              f"- MoE: {moe_syncs} per MoE layer in the trace. The rows per expert are "
              "counted with `scatter_add_` into a zeroed [E] tensor on the device "
              "(`moe.expert_counts`; `torch.bincount` read its input's min and max to the host "
              "in PyTorch's CUDA implementation, twice per layer, and would fail under "
              "CUDA-graph capture). tests/test_model_moe.py traces the grouped path for host "
              "syncs on the CPU; the capture itself is tested on a GPU only.", ""]
    return lines


def section_text() -> str:
    config = preset_config(PRESET)
    later_step = step_ops.count_step_ops()
    first_step = step_ops.count_step_ops(first_step=True)
    eager_step = step_ops.count_step_ops(first_step=True, captured=False)
    lines = ["## GPU projections", "",
             "Generated by `python benchmarks/gpu_projection.py`; do not edit by hand. **Every "
             "figure in this section is a projection** from the model's sizes and the devices' "
             "datasheet bandwidth, not a measurement: no GPU has run this code.", ""]
    lines += assumptions(config) + distinct_section(config) + bytes_section(config)
    lines += projection_section(config) + schedule_section(config)
    lines += overheads_section(config, later_step, eager_step)
    lines += step_section(config, later_step, first_step, eager_step)
    return "\n".join(lines).rstrip() + "\n"


def write_section(text: str, path: Path = DOC) -> None:
    """Replaces the text between the markers (creating the file or the markers if missing)."""
    block = f"{BEGIN}\n{text}{END}\n"
    doc = path.read_text() if path.exists() else DOC_HEADER
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        doc = head + block + rest.split(END, 1)[1].lstrip("\n")
    else:
        doc = doc.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(doc)
    tmp.replace(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--print", dest="print_only", action="store_true",
                   help="print the section instead of writing docs/PERFORMANCE.md")
    args = p.parse_args(argv)
    text = section_text()
    if args.print_only:
        print(text, end="")
    else:
        write_section(text)
        print(f"wrote the GPU projections section of {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
