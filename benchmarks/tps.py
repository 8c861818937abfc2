"""Decoding throughput: forwards/s, tokens per forward (TPF), tokens/s, and the share of step time
spent outside the model forward, for the fast path and the eager reference path in one run.

    python benchmarks/tps.py --model PATH [--prompts benchmarks/prompts/default.jsonl]
    python benchmarks/tps.py --synthetic llada2-mini --device cuda     # random weights
    python benchmarks/tps.py --synthetic tiny --quick                  # CI-sized, CPU
    python benchmarks/tps.py --synthetic llada2-mini --tp 2            # tensor parallel, 2 ranks

Paths: "fast" = native ops (torch.ops.dmax) with CUDA-graph replay on CUDA (on CPU: eager, through
the native CPU kernels); "reference" = the same decode through the pure-PyTorch ops of
dmax_ext.reference, eager. On CUDA, --verify (default on) first checks that graph replay decodes
exactly what the eager native path decodes (exit status 1 if not). How many prompts decode to the
same tokens with native and reference ops is reported: their floats may differ by an ulp, which
can change a threshold decision and from there SPD's trajectory. The outside-forward share comes
from timed sections (timing=True: synced, no graphs) and is ops / (forward + ops).
TPF is per sequence (tokens / the forwards it took part in, SPEC section 5), summed over the
prompts; forwards/s counts the batched forwards actually run.
Roofline (CPU, --roofline, default on): in the same run and at the same thread count, the copy
bandwidth and matmul throughput are measured (roofline.measure_machine) and one block forward of
this configuration (later steps captured from decoding the first batch; block_forward.py) is
timed next to its floor, counted with the experts its routing actually selected.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import dmax_ext
from dmax_ext.cli import DTYPES, resolve_dtype, tensor_parallel_size
from dmax_ext.decoding import DEFAULT_BLOCK_LENGTH, DEFAULT_THRESHOLD, MODES, SCHEDULERS, decode
from dmax_ext.distributed import init_tensor_parallel, launched_world_size, spawn_local
from dmax_ext.model.tensor_parallel import load_sharded_model, shard_model, tensor_parallel_rank
from dmax_ext.training.data import encode_prompt, read_jsonl

DEFAULT_PROMPTS = Path(__file__).resolve().parent / "prompts" / "default.jsonl"
# Synthetic prompts: random ids, lengths cycling through these (tokens; 8 different: a batch of 8).
SYNTHETIC_PROMPT_LENGTHS = (48, 61, 75, 90, 104, 117, 37, 129)
# random_model's confidence settings per preset (the one place they are chosen). llada2-small:
# lm_head = gain x the input embedding (random_model's lm_head_from_embedding: an unmasked
# position predicts its own token, a masked one what its context points at, as in a trained
# model), the gain chosen for a realistic TPF at threshold 0.5 on the synthetic prompts
# (docs/PERFORMANCE.md, 2026-11-25); with it, native and reference ops decode the same tokens.
# Other presets: independent random lm_head rows at gain 200 (peaked; blocks converge in a few
# steps).
SYNTHETIC_WEIGHTS = {"llada2-small": {"lm_head_gain": 25.0, "lm_head_from_embedding": True}}
DEFAULT_SYNTHETIC_WEIGHTS = {"lm_head_gain": 200.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="checkpoint folder (with a tokenizer)")
    src.add_argument("--synthetic", metavar="PRESET",
                     help="random_model preset: llada2-mini (GPU), llada2-small or tiny (CPU)")
    p.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="jsonl of {prompt: ...}")
    p.add_argument("--batch", type=int, default=1, help="the most prompts decoded at once")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="auto",
                   help="how a batch's sequences move from block to block (decode(): auto = "
                        "rolling for a CUDA batch, else lockstep)")
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block-length", type=int, default=DEFAULT_BLOCK_LENGTH)
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    p.add_argument("--mode", choices=MODES, default="spd")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--quick", action="store_true",
                   help="CI-sized: 2 prompts, 16 new tokens, block 8")
    p.add_argument("--no-verify", dest="verify", action="store_false")
    p.add_argument("--no-roofline", dest="roofline", action="store_false",
                   help="skip the machine measurement and the block-forward floor (CPU)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads first (CPU)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--tp", type=int, default=None, metavar="N",
                   help="tensor parallel over N ranks: spawns them (or run under torchrun "
                        "--nproc-per-node N); rank 0 prints")
    args = p.parse_args(argv)
    if args.quick:
        args.gen_length, args.block_length = 16, 8
    return args


def load(args):
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    records = read_jsonl(args.prompts)
    n_prompts = 2 if args.quick else len(records)
    group = None
    if tensor_parallel_size(args) > 1:
        group, device = init_tensor_parallel(device.type)
    if args.model is not None:
        model = (load_sharded_model(args.model, group, device=device, dtype=dtype) if group
                 else dmax_ext.load_model(args.model, device=device, dtype=dtype))
        if model.tokenizer is None:
            sys.exit(f"{args.model}: no tokenizer; tps.py needs one to encode the prompts")
        prompts = [encode_prompt(model.tokenizer, [{"role": "user", "content": r["prompt"]}])
                   for r in records[:n_prompts]]
        name = str(args.model)
    else:
        model = synthetic_model(args.synthetic, device, dtype)
        if group is not None:
            shard_model(model, group)
        prompts = synthetic_prompts(model.config, n_prompts)
        name = f"synthetic {args.synthetic}"
    return model, prompts, name


def synthetic_weights(preset: str) -> dict:
    return SYNTHETIC_WEIGHTS.get(preset, DEFAULT_SYNTHETIC_WEIGHTS)


def synthetic_model(preset: str, device, dtype):
    """random_model(preset) with the preset's benchmark confidence settings (SYNTHETIC_WEIGHTS)."""
    return dmax_ext.random_model(preset, device=device, dtype=dtype, **synthetic_weights(preset))


def synthetic_prompts(config, n: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    special = {config.mask_token_id, config.eos_token_id}
    prompts = []
    for i in range(n):
        length = SYNTHETIC_PROMPT_LENGTHS[i % len(SYNTHETIC_PROMPT_LENGTHS)]
        ids = torch.randint(config.vocab_size, (length,),
                            generator=generator).tolist()
        prompts.append([t if t not in special else 0 for t in ids])
    return prompts


def run_path(model, prompts, args, ops: str, cuda_graphs: bool, timing: bool):
    """Decodes every prompt, args.batch at a time (decode's max_batch: in groups with the
    lockstep schedule, a waiting prompt admitted as soon as a sequence finishes with the rolling
    one); returns totals."""
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = decode(model, prompts, gen_length=args.gen_length, block_length=args.block_length,
                 threshold=args.threshold, mode=args.mode, ops=ops, cuda_graphs=cuda_graphs,
                 timing=timing, scheduler=args.scheduler, max_batch=args.batch)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return {"wall_s": time.perf_counter() - start, "nfe": out.nfe, "seq_nfe": sum(out.seq_nfe),
            "tokens": sum(map(len, out.tokens)), "outputs": out.tokens,
            "forward_s": out.forward_s if timing else 0.0, "ops_s": out.ops_s if timing else 0.0}


def measure(model, prompts, args, label: str, ops: str, cuda_graphs: bool) -> dict:
    run_path(model, prompts[:args.batch], args, ops, cuda_graphs, timing=False)  # warm-up
    if model.device.type == "cuda":
        speed = run_path(model, prompts, args, ops, cuda_graphs, timing=False)
        split = run_path(model, prompts, args, ops, False, timing=True)  # synced sections
    else:  # on CPU the timed sections need no sync: one run gives both
        speed = split = run_path(model, prompts, args, ops, False, timing=True)
    step_s = split["forward_s"] + split["ops_s"]
    return {
        "path": label, "ops": ops, "cuda_graphs": cuda_graphs,
        "forwards_per_s": speed["nfe"] / speed["wall_s"],
        "tpf": speed["tokens"] / speed["seq_nfe"],
        "tokens_per_s": speed["tokens"] / speed["wall_s"],
        "outside_forward_share": split["ops_s"] / step_s if step_s else 0.0,
        "wall_s": speed["wall_s"], "nfe": speed["nfe"], "tokens": speed["tokens"],
        "outputs": speed["outputs"],
    }


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def verify_graphs(model, prompts, args) -> bool:
    """The CUDA-graph path decodes exactly what the eager native path decodes (same kernels on
    the same inputs: bitwise equal), checked on the first batch before timing."""
    graphed = run_path(model, prompts[:args.batch], args, "native", True, timing=False)
    eager = run_path(model, prompts[:args.batch], args, "native", False, timing=False)
    return graphed["outputs"] == eager["outputs"]


def block_forward_roofline(model, prompts, args):
    """(machine, report) for one block forward of this configuration, or None where it does not
    apply (CUDA: the machine figures are the CPU's; tensor parallel; dtypes not measured)."""
    import block_forward
    import roofline
    if model.device.type != "cpu" or getattr(model, "tp_group", None) is not None \
            or model.dtype not in roofline.MATMUL_DTYPES:
        return None
    steps = block_forward.capture_block_steps(
        model, prompts[:args.batch], gen_length=args.gen_length, block_length=args.block_length,
        threshold=args.threshold, mode=args.mode)
    if not steps:
        return None
    machine = roofline.measure_machine(
        model.config, copy_bytes=roofline.COPY_BYTES >> (3 if args.quick else 1),
        repeats=3, block_length=args.block_length)
    report = block_forward.block_forward_report(model, block_forward.spread(steps, 3), machine,
                                                repeats=3 if args.quick else 5)
    return machine, report


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if tensor_parallel_size(args) > 1 and launched_world_size() == 1:  # each rank runs main
        return spawn_local(main, args.tp, sys.argv[1:] if argv is None else argv)
    model, prompts, name = load(args)
    device = model.device
    graphs = device.type == "cuda"
    verified = verify_graphs(model, prompts, args) if graphs and args.verify else None
    fast_label = "fast (native + CUDA graphs)" if graphs else "fast (native, eager)"
    results = [measure(model, prompts, args, fast_label, "native", graphs),
               measure(model, prompts, args, "reference (eager)", "reference", False)]
    identical = sum(a == b for a, b in zip(results[0]["outputs"], results[1]["outputs"]))
    rooflined = block_forward_roofline(model, prompts, args) if args.roofline else None
    if tensor_parallel_rank(model) != 0:  # every rank measured the same run: rank 0 reports
        return 1 if verified is False else 0
    print(f"model: {name}  device: {device_label(device)}  dtype: {model.dtype}  "
          f"mode: {args.mode}  batch: {args.batch}  scheduler: {args.scheduler}  "
          f"prompts: {len(prompts)}  "
          f"gen_length: {args.gen_length}  block_length: {args.block_length}  "
          f"threshold: {args.threshold}  tp: {tensor_parallel_size(args)}")
    header = f"{'path':<30} {'forwards/s':>11} {'TPF':>6} {'tokens/s':>10} {'outside fwd':>12}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['path']:<30} {r['forwards_per_s']:>11.2f} {r['tpf']:>6.2f} "
              f"{r['tokens_per_s']:>10.1f} {100 * r['outside_forward_share']:>11.1f}%")
    print(f"native and reference ops decode the same tokens for {identical}/{len(prompts)} "
          "prompts (their float rounding may differ by an ulp, which can steer SPD differently)")
    if verified is not None:
        print(f"verify (CUDA graphs == eager): {'ok' if verified else 'MISMATCH'}")
    if rooflined is not None:
        import roofline
        machine, forward = rooflined
        print(f"roofline (this run, {machine.threads} threads): copy {machine.copy_gbps:.1f} GB/s; "
              "fastest matmul (the floor's) " + ", ".join(
                  f"{roofline.dtype_name(d)} {machine.flops_per_s(d) / 1e9:.0f} "
                  f"({machine.fastest_shape(d)})" for d in roofline.MATMUL_DTYPES) + " GFLOP/s")
        print(f"{forward.line()} (batch {args.batch}, {model.dtype})")
    if args.out is not None:
        report = {"model": name, "device": device_label(device), "dtype": str(model.dtype),
                  "mode": args.mode, "batch": args.batch, "prompts": len(prompts),
                  "gen_length": args.gen_length, "block_length": args.block_length,
                  "threshold": args.threshold, "tp": tensor_parallel_size(args),
                  "graphs_verified": verified,
                  "identical_to_reference": identical,
                  "block_forward": None if rooflined is None else {
                      "copy_gbps": rooflined[0].copy_gbps,
                      "matmul_gflops": rooflined[0].matmul_gflops,
                      "measured_ms": rooflined[1].measured_ms, "floor_ms": rooflined[1].floor_ms,
                      "ratio": rooflined[1].ratio, "bytes_mb": rooflined[1].bytes_mb,
                      "gflop": rooflined[1].gflop,
                      "distinct_experts": rooflined[1].distinct_experts},
                  "results": [{k: v for k, v in r.items() if k != "outputs"} for r in results]}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if verified is False else 0


if __name__ == "__main__":
    sys.exit(main())
