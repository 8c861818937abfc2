"""A batch decode of many prompts under each schedule: the forwards it runs (a count, the same on
any machine) and what those forwards would cost on a GPU (a projection).

    python benchmarks/schedules.py                          # 32 prompts, at most 8 at once
    python benchmarks/schedules.py --prompts 16 --batch 4 --dtype float32
    python benchmarks/schedules.py --model path/to/LLaDA2.0-mini --device cuda   # a GPU run
    python benchmarks/schedules.py --plot docs/schedules.png   # and the rows of each forward

Three decodes of the same prompts (llada2-small with the benchmarks' synthetic weights, on the
CPU): one by one (lockstep, max_batch 1), lockstep in groups of --batch, and rolling with at most
--batch running (a waiting prompt admitted as soon as a sequence finishes). Every forward's shape
is recorded (rows, tokens fed, cache slots, logits) and costed as the same forward of
llada2-mini on an H200 at TP 2 (gpu_projection.decode_ms: the bandwidth floor, or the
arithmetic at an assumed share of the peak): the synthetic model's step counts with the
real model's bytes, a projection, not a GPU measurement. Wall-clock tokens/s are printed for
what they are: the device's (on a CPU a block forward is compute-bound and batching gains
little). --model takes a checkpoint folder instead (the prompts stay synthetic ids: the counts
and the speed are what this measures), --device cuda runs it there (decode's CUDA graphs).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import block_forward  # noqa: E402
import gpu_projection  # noqa: E402
import tps  # noqa: E402
from dmax_ext import load_model  # noqa: E402
from dmax_ext.decoding import decode  # noqa: E402

PRESET = "llada2-small"   # the decodes' model (--preset tiny: a smoke run)
GPU, TP = "H200", 2


def run(model, prompts, args, scheduler: str, max_batch: int) -> dict:
    # Recording reads each forward's write slot on the host, so it decodes eagerly; on CUDA the
    # timed run (CUDA graphs) is a second decode.
    out, shapes = block_forward.record_forward_shapes(
        model, prompts, gen_length=args.gen_length, block_length=args.block_length,
        threshold=args.threshold, scheduler=scheduler, max_batch=max_batch, cuda_graphs=False)
    wall = out.wall_s  # on the CPU the recorded decode is the timed one
    if model.device.type == "cuda":
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = decode(model, prompts, gen_length=args.gen_length, block_length=args.block_length,
                     threshold=args.threshold, scheduler=scheduler, max_batch=max_batch)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    tokens = sum(map(len, out.tokens))
    gpu_ms = gpu_projection.decode_ms(shapes, GPU, TP)
    return {"out": out, "nfe": out.nfe, "tokens": tokens, "tokens_per_s": tokens / wall,
            "rows_per_forward": sum(s.batch for s in shapes) / len(shapes), "shapes": shapes,
            "gpu_ms": gpu_ms, "gpu_tokens_per_s": 1e3 * tokens / gpu_ms}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=PRESET, help="a synthetic model of this preset")
    src.add_argument("--model", type=Path, help="a checkpoint folder instead")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--batch", type=int, default=8, help="the most prompts decoded at once")
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plot", type=Path, help="write a PNG of the rows each forward decodes")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = (tps.synthetic_model(args.preset, args.device, dtype) if args.model is None
             else load_model(args.model, device=args.device, dtype=dtype))
    model_name = args.model or f"{args.preset} (synthetic weights)"
    prompts = tps.synthetic_prompts(model.config, args.prompts)
    print(f"schedules: {model_name}, {args.dtype}, {args.prompts} prompts of "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens, gen_length "
          f"{args.gen_length}, block {args.block_length}, threshold {args.threshold}; device "
          f"{tps.device_label(model.device)}, CPU {torch.backends.cpu.get_cpu_capability()}")
    runs = {"one by one": run(model, prompts, args, "lockstep", 1),
            f"lockstep, groups of {args.batch}": run(model, prompts, args, "lockstep",
                                                     args.batch),
            f"rolling, {args.batch} at once": run(model, prompts, args, "rolling", args.batch)}
    alone = runs["one by one"]
    print(f"\n{'schedule':<26} {'forwards':>9} {'rows/fwd':>9} {'as alone':>9} "
          f"{model.device.type + ' tok/s':>10} {f'{GPU} TP{TP} tok/s (projection)':>30} "
          f"{'vs one by one':>14}")
    for name, r in runs.items():
        same = block_forward.decoded_as_alone(r["out"], alone["out"].tokens,
                                              alone["out"].seq_nfe)
        gain = r["gpu_tokens_per_s"] / alone["gpu_tokens_per_s"]
        print(f"{name:<26} {r['nfe']:>9} {r['rows_per_forward']:>9.2f} "
              f"{same:>4}/{args.prompts:<4} {r['tokens_per_s']:>10.1f} "
              f"{r['gpu_tokens_per_s']:>30,.0f} {gain:>13.2f}x")
    if args.plot:
        plot_rows(runs, args, model_name, args.plot)
        print(f"wrote {args.plot}")
    return 0


def plot_rows(runs: dict, args, name: str, path: Path) -> None:
    """Rows decoding in each forward (prefills left out) against the forward's index: how full
    each schedule keeps the batch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.2, 3.6))
    for label, r in list(runs.items())[1:]:
        rows = [s.batch for s in r["shapes"] if s.n_logits]
        ax.step(range(1, len(rows) + 1), rows, where="post", linewidth=1,
                label=f"{label}: {r['nfe']} forwards")
    ax.set_xlabel("forward")
    ax.set_ylabel("rows decoding")
    ax.set_ylim(0, args.batch + 0.5)
    ax.set_title(f"{args.prompts} prompts, at most {args.batch} at once ({name}, {args.dtype})",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
