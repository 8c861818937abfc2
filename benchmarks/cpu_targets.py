"""The CPU targets of issue 9 on llada2-small, measured in one run, each printed pass / fail:

1. batch 1, block 32, float32 and bfloat16: one block forward within 1.5x of its roofline floor
   (block_forward.py: later SPD steps of a real decode, the experts their routing selected, the
   machine measured in this run at this thread count);
2. the SPD work outside the model forward under 5% of step time (batch 1 decodes: the timed SPD
   ops, and everything outside the forward: wall - forward time);
3. end to end >= 3x faster than the same decode through the reference ops (ops="reference") and
   the per-expert MoE (set_moe_impl("reference")), with identical tokens;
4. batch 8 (different prompt lengths) >= 4x the tokens/s of the same prompts decoded one by one.

    python benchmarks/cpu_targets.py                  # all four, 1 thread, both dtypes
    python benchmarks/cpu_targets.py --profile        # where one block forward's time goes
    python benchmarks/cpu_targets.py --quick          # smoke run: 2 prompts, 64 tokens

The machine is shared and its load moves timings by 2x between minutes: every comparison is made
within this run, A and B interleaved (fast / reference per prompt, batch 8 / batch 1 per round,
float32 / bfloat16 per repeat), and medians are reported. Threads: 1 by default (see
docs/PERFORMANCE.md: under load, 2 threads make block-sized GEMMs 7-90x slower).
Models: tps.synthetic_model (the preset's benchmark weights) and tps.synthetic_prompts.
"""
from __future__ import annotations

import argparse
import contextlib
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
import gpu_projection  # noqa: E402
import roofline  # noqa: E402
import tps  # noqa: E402
from dmax_ext.decoding import decode  # noqa: E402

PRESET = "llada2-small"
DTYPES = (torch.float32, torch.bfloat16)
BLOCK_FORWARD_MAX_RATIO = 1.5
OUTSIDE_FORWARD_MAX_SHARE = 0.05
REFERENCE_MIN_SPEEDUP = 3.0
BATCH8_MIN_SPEEDUP = 4.0
BATCH = 8


def dtype_name(dtype) -> str:
    return roofline.dtype_name(dtype)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def decode_args(args) -> dict:
    return dict(gen_length=args.gen_length, block_length=args.block_length,
                threshold=args.threshold)


# ---- target 1: block forward vs floor -----------------------------------------------------------

def quick_machine(config, block_length: int, copy_bytes: int) -> roofline.MachineRoofline:
    """A round's machine: one copy sample, and one matmul sample per dtype at the block's shapes
    (the library's dense-MLP matmul, our kernel's lm_head; the peak square is measured once by
    target 4)."""
    shapes = {label: shape for label, shape in roofline.matmul_shapes(config, block_length).items()
              if label in (f"small-{block_length}",
                           f"{roofline.KERNEL_PREFIX}lm_head-{block_length}")}
    return roofline.MachineRoofline(
        copy_gbps=roofline.measure_copy_gbps(copy_bytes, repeats=1),
        matmul_gflops=roofline.measure_matmul_rates(shapes, repeats=1, min_sample_s=0.05),
        shapes=shapes, threads=torch.get_num_threads(), load_average=os.getloadavg())


def block_forward_target(models, prompts, args) -> list[dict]:
    """Later steps captured from decoding prompt 0 alone. Each round measures the machine
    (one copy, one matmul sample per dtype) and then times every step of every dtype once, so a
    change of the machine's load falls on a round's floor and its forwards alike; a step's ratio
    is the median over rounds of time / that round's floor."""
    copy_bytes = roofline.COPY_BYTES >> (3 if args.quick else 2)
    config = next(iter(models.values())).config
    steps = {d: block_forward.spread(block_forward.capture_block_steps(
        m, [prompts[0]], **decode_args(args)), args.steps) for d, m in models.items()}
    costs = {d: [block_forward.block_step_cost(models[d], s) for s in steps[d]] for d in models}
    caches = {d: [models[d].new_cache(s.batch, s.write_slot + s.block_length) for s in steps[d]]
              for d in models}
    times = {d: [[] for _ in steps[d]] for d in models}
    floors = {d: [[] for _ in steps[d]] for d in models}
    machines = []
    with contextlib.ExitStack() as decoding:
        decoding.enter_context(torch.inference_mode())
        for model in models.values():  # the forwards as decode() runs them
            decoding.enter_context(block_forward.as_in_decode(model))
        for d in models:  # warm-up
            for s, c in zip(steps[d], caches[d]):
                block_forward.replay(models[d], s, c)
        for _ in range(args.repeats):
            machine = quick_machine(config, args.block_length, copy_bytes)
            machines.append(machine)
            for d in models:
                for i, (s, c) in enumerate(zip(steps[d], caches[d])):
                    start = time.perf_counter()
                    block_forward.replay(models[d], s, c)
                    times[d][i].append(1e3 * (time.perf_counter() - start))
                    floors[d][i].append(block_forward.floor_ms(costs[d][i], machine, d))
    results = []
    for d in models:
        ratios = [statistics.median(t / f for t, f in zip(ts, fs))
                  for ts, fs in zip(times[d], floors[d])]
        results.append({
            "dtype": dtype_name(d), "steps": len(steps[d]),
            "write_slots": [s.write_slot for s in steps[d]],
            "measured_ms": statistics.median(statistics.median(t) for t in times[d]),
            "floor_ms": statistics.median(statistics.median(f) for f in floors[d]),
            "ratio": statistics.median(ratios),
            "bytes_mb": statistics.median(c.total_bytes for c in costs[d]) / 1e6,
            "gflop": statistics.median(c.total_flops for c in costs[d]) / 1e9,
            "experts_mb": statistics.median(c.bytes["experts"] for c in costs[d]) / 1e6})
    print(f"  machine over {len(machines)} rounds (min / median / max): copy "
          + "/".join(f"{f(m.copy_gbps for m in machines):.1f}"
                     for f in (min, statistics.median, max)) + " GB/s; matmul GFLOP/s " + "; ".join(
              f"{k} {label} " + "/".join(f"{f(m.matmul_gflops[k][label] for m in machines):.0f}"
                                         for f in (min, statistics.median, max))
              for k in machines[0].matmul_gflops for label in machines[0].shapes)
          + "; floors at each round's fastest; load "
          + " ".join(f"{x:.1f}" for x in machines[0].load_average))
    return results


# ---- targets 2 and 3: batch 1, fast vs reference ------------------------------------------------

def reference_target(model, prompts, args) -> dict:
    """Each prompt decoded alone by the fast path (native ops, MoE "auto") and by the reference
    (reference ops, per-expert MoE), alternating; the fast runs are timed by section."""
    fast = {"wall": 0.0, "forward": 0.0, "ops": 0.0, "tokens": 0, "nfe": 0}
    ref = {"wall": 0.0, "tokens": 0}
    identical = 0
    kwargs = decode_args(args)
    decode(model, [prompts[0]], **{**kwargs, "gen_length": args.block_length})  # warm-up
    for prompt in prompts:
        model.set_moe_impl("auto")
        start = time.perf_counter()
        a = decode(model, [prompt], ops="native", timing=True, **kwargs)
        fast["wall"] += time.perf_counter() - start
        fast["forward"] += a.forward_s
        fast["ops"] += a.ops_s
        fast["tokens"] += len(a.tokens[0])
        fast["nfe"] += a.nfe
        model.set_moe_impl("reference")
        start = time.perf_counter()
        b = decode(model, [prompt], ops="reference", **kwargs)
        ref["wall"] += time.perf_counter() - start
        ref["tokens"] += len(b.tokens[0])
        identical += a.tokens == b.tokens
    model.set_moe_impl("auto")
    return {"dtype": dtype_name(model.dtype), "prompts": len(prompts), "identical": identical,
            "fast_tokens_per_s": fast["tokens"] / fast["wall"],
            "ref_tokens_per_s": ref["tokens"] / ref["wall"],
            "speedup": (fast["tokens"] / fast["wall"]) / (ref["tokens"] / ref["wall"]),
            "tpf": fast["tokens"] / fast["nfe"], "forward_ms": 1e3 * fast["forward"] / fast["nfe"],
            "ops_share": fast["ops"] / (fast["forward"] + fast["ops"]),
            "outside_share": (fast["wall"] - fast["forward"]) / fast["wall"]}


# ---- target 4: batch 8 vs batch 1 ---------------------------------------------------------------

def batch_target(model, prompts, args) -> dict:
    """The same BATCH prompts (different lengths) decoded as one batch and one by one, rounds
    interleaved; tokens/s of each, median over rounds. Also the two ceilings on the speedup
    that no implementation of this decode can pass (batch_ceilings), and how many sequences
    the batch decoded exactly as alone (tokens and forwards): the comparison is of one decode
    only if all of them (decode()'s batch invariance; a bf16 batch of before took other paths,
    docs/PERFORMANCE.md 2026-12-06 23:45)."""
    kwargs = decode_args(args)
    batched, rolled, alone, alone_walls = [], [], [], []
    decode(model, prompts[:2], **{**kwargs, "gen_length": args.block_length})  # warm-up
    for _ in range(args.rounds):
        start = time.perf_counter()
        out = decode(model, prompts, **kwargs)
        batched.append(sum(map(len, out.tokens)) / (time.perf_counter() - start))
        # The rolling schedule (decoding/rolling.py; decode's default on CUDA only): fewer
        # forwards, most of twice the tokens a row, a gain only where forwards are bandwidth-bound.
        start = time.perf_counter()
        rolling = decode(model, prompts, scheduler="rolling", **kwargs)
        rolled.append(sum(map(len, rolling.tokens)) / (time.perf_counter() - start))
        tokens, wall, solo = 0, 0.0, []
        for p in prompts:
            start = time.perf_counter()
            solo.append(decode(model, [p], **kwargs))
            wall += time.perf_counter() - start
            tokens += len(solo[-1].tokens[0])
        alone.append(tokens / wall)
        alone_walls.append(wall)
    solo_tokens, solo_nfe = [s.tokens[0] for s in solo], [s.nfe for s in solo]
    as_alone = block_forward.decoded_as_alone(out, solo_tokens, solo_nfe)
    rolling_as_alone = block_forward.decoded_as_alone(rolling, solo_tokens, solo_nfe)
    # The same decodes' forwards costed as llada2-mini's on an H200 (a projection): batching
    # where forwards are bandwidth-bound.
    gpu_ms = {name: gpu_projection.decode_ms(block_forward.record_forward_shapes(
                  model, prompts, scheduler=scheduler, max_batch=max_batch, **kwargs)[1])
              for name, scheduler, max_batch in (("alone", "lockstep", 1),
                                                 ("lockstep", "lockstep", None),
                                                 ("rolling", "rolling", None))}
    b8, b1 = statistics.median(batched), statistics.median(alone)
    return {"dtype": dtype_name(model.dtype), "batch": len(prompts),
            "prompt_lengths": [len(p) for p in prompts], "batch_tokens_per_s": b8,
            "alone_tokens_per_s": b1, "speedup": b8 / b1, "nfe": out.nfe, "tpf": out.tpf,
            "as_alone": as_alone, "rolling_tokens_per_s": statistics.median(rolled),
            "rolling_speedup": statistics.median(rolled) / b1, "rolling_nfe": rolling.nfe,
            "rolling_forwards": sum(rolling.seq_nfe) / rolling.nfe,
            "rolling_as_alone": rolling_as_alone,
            "gpu_lockstep_speedup": gpu_ms["alone"] / gpu_ms["lockstep"],
            "gpu_rolling_speedup": gpu_ms["alone"] / gpu_ms["rolling"],
            **batch_ceilings(model, prompts, kwargs, statistics.median(alone_walls))}


def best_matmul_gflops(config, dtype, block_length: int) -> float:
    """The fastest matmul rate measured here for dtype, at every shape of the roofline (the
    library's and our kernel's): the throughput target 1's floors take too."""
    rates = roofline.measure_matmul_rates(roofline.matmul_shapes(config, block_length), [dtype],
                                          repeats=1)
    return max(rates[dtype_name(dtype)].values())


def batch_ceilings(model, prompts, kwargs, alone_wall_s: float) -> dict:
    """Upper bounds on batch-vs-alone tokens/s for this decode, whatever the implementation
    (each sequence must decode exactly as it would alone, so its forward count is fixed):

    - forwards: sum(seq_nfe) / nfe = the rows a batched forward decodes on average. A batched
      forward costs at least a one-row forward on any machine, and the alone runs pay one
      one-row forward per seq_nfe. (Rows leave a block when it converges, engine.py; the rolling
      schedule, which starts rows' next blocks early, is bounded the same way by
      sum(seq_nfe) / max(seq_nfe), and reaches it.)
    - flops: the measured alone wall time / the batched decode's FLOPs (prefill, first steps of
      2 blocks, later steps; roofline.block_forward_cost) at this machine's peak matmul rate: the
      batched decode cannot run faster than its arithmetic where it is compute-bound."""
    out, shapes = block_forward.record_forward_shapes(model, prompts, **kwargs)
    flops = 0.0
    for s in shapes:
        cost = roofline.block_forward_cost(model.config, s.n_tokens, s.cache_slots,
                                           batch=s.batch, weight_bytes=model.dtype.itemsize)
        # block_forward_cost counts logits for every fed token; the forward computes n_logits
        flops += cost.total_flops - cost.flops["lm_head"] * (1 - s.n_logits / s.n_tokens)
    peak = best_matmul_gflops(model.config, model.dtype, kwargs["block_length"]) * 1e9
    return {"live_rows": sum(out.seq_nfe) / out.nfe,
            "scheduler_bound": sum(out.seq_nfe) / max(out.seq_nfe),
            "flops_ceiling": alone_wall_s / (flops / peak), "batched_gflop": flops / 1e9,
            "peak_gflops": peak / 1e9}


# ---- profile ------------------------------------------------------------------------------------

def _section_hooks(model, seconds: dict):
    """Wall time per part of the forward (1 thread, CPU: synchronous), via module hooks."""
    from dmax_ext.model.moe import MoeBlock
    parts = [("lm_head", model.lm_head), ("norms", model.model.norm)]
    for layer in model.model.layers:
        parts += [("norms", layer.input_layernorm), ("norms", layer.post_attention_layernorm),
                  ("attention", layer.attention)]
        if isinstance(layer.mlp, MoeBlock):
            parts += [("moe router", layer.mlp.gate), ("moe experts", layer.mlp.experts)]
            if layer.mlp.shared_experts is not None:
                parts.append(("moe shared expert", layer.mlp.shared_experts))
        else:
            parts.append(("dense mlp", layer.mlp))
    starts, handles = {}, []
    for name, module in parts:
        def pre(module, inputs, name=name):
            starts[id(module)] = time.perf_counter()

        def post(module, inputs, output, name=name):
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - starts[id(module)]
        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def profile(models, prompts, args) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    for d, model in models.items():
        steps = block_forward.spread(block_forward.capture_block_steps(
            model, prompts[:args.profile_batch], **decode_args(args)), args.steps)
        caches = [model.new_cache(s.batch, s.write_slot + s.block_length) for s in steps]
        seconds: dict = {}
        with torch.inference_mode():
            with block_forward.as_in_decode(model):  # ends before the hooks come
                for s, c in zip(steps, caches):
                    block_forward.replay(model, s, c)
                start = time.perf_counter()
                for _ in range(args.repeats):
                    for s, c in zip(steps, caches):
                        block_forward.replay(model, s, c)
                plain = time.perf_counter() - start
            # Hooks make each layer run its modules one by one (model/native_layer.py), which
            # the section timers need; the plain forward runs a layer as one op.
            handles = _section_hooks(model, seconds)
            start = time.perf_counter()
            for _ in range(args.repeats):
                for s, c in zip(steps, caches):
                    block_forward.replay(model, s, c)
            total = time.perf_counter() - start
            for h in handles:
                h.remove()
            with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for s, c in zip(steps, caches):
                    block_forward.replay(model, s, c)
        n = args.repeats * len(steps)
        print(f"\n{dtype_name(d)}: one block forward (batches {[s.batch for s in steps]}, write "
              f"slots {[s.write_slot for s in steps]}, mean of {n}): {1e3 * plain / n:.1f} ms "
              f"as run (a layer one dmax.decoder_layer op); {1e3 * total / n:.1f} ms with the "
              f"section hooks (each layer's modules one by one), split as:")
        for name, sec in sorted(seconds.items(), key=lambda kv: -kv[1]):
            print(f"  {name:<20}{1e3 * sec / n:8.2f} ms {100 * sec / total:5.1f}%")
        rest = total - sum(seconds.values())
        print(f"  {'other (rotary, mask, residual, glue)':<20}{1e3 * rest / n:8.2f} ms "
              f"{100 * rest / total:5.1f}%")
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=args.profile_rows, max_name_column_width=40,
            max_shapes_column_width=70))


# ---- main ---------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=PRESET, help="the targets are set for llada2-small; "
                                                      "tiny: a smoke run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompts", type=int, default=6, help="batch-1 prompts for targets 2 and 3")
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=4, help="later steps timed for target 1")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per step (target 1)")
    p.add_argument("--rounds", type=int, default=2, help="batch-8 / alone rounds (target 4)")
    p.add_argument("--dtypes", nargs="+", default=[dtype_name(d) for d in DTYPES],
                   choices=[dtype_name(d) for d in DTYPES])
    p.add_argument("--targets", nargs="+", type=int, default=[1, 2, 3, 4], choices=[1, 2, 3, 4])
    p.add_argument("--profile", action="store_true", help="only the block-forward profile")
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--profile-batch", type=int, default=1, help="prompts decoded together")
    p.add_argument("--quick", action="store_true", help="2 prompts, 64 tokens, 3 repeats")
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.gen_length, args.repeats, args.rounds, args.steps = 2, 64, 3, 1, 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dtypes = [getattr(torch, d) for d in args.dtypes]
    models = {d: tps.synthetic_model(args.preset, "cpu", d) for d in dtypes}
    config = models[dtypes[0]].config
    prompts = tps.synthetic_prompts(config, max(args.prompts, BATCH))
    print(f"cpu_targets: {args.preset}, threads {torch.get_num_threads()}, torch "
          f"{torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, load "
          f"{os.getloadavg()[0]:.1f}; gen_length {args.gen_length}, block {args.block_length}, "
          f"threshold {args.threshold}; synthetic weights {tps.synthetic_weights(args.preset)}")
    if args.profile:
        profile(models, prompts, args)
        return 0
    failed = False
    if 1 in args.targets:
        print(f"\n[1] one block forward, batch 1, block {args.block_length}: "
              f"<= {BLOCK_FORWARD_MAX_RATIO}x the floor")
        for r in block_forward_target(models, prompts, args):
            ok = r["ratio"] <= BLOCK_FORWARD_MAX_RATIO
            failed |= not ok
            print(f"  {verdict(ok)} {r['dtype']:<9} measured {r['measured_ms']:7.1f} ms  floor "
                  f"{r['floor_ms']:6.1f} ms  ratio {r['ratio']:.2f} (median over rounds of each "
                  f"round's time / floor)  ({r['bytes_mb']:.0f} MB of "
                  f"which experts {r['experts_mb']:.0f} MB, {r['gflop']:.2f} GFLOP; median of "
                  f"{r['steps']} later steps at write slots {r['write_slots']})")
    if 2 in args.targets or 3 in args.targets:
        print(f"\n[2] SPD work outside the forward < {100 * OUTSIDE_FORWARD_MAX_SHARE:.0f}% of "
              f"step time; [3] end to end >= {REFERENCE_MIN_SPEEDUP}x the reference, identical "
              f"tokens ({args.prompts} prompts, batch 1)")
        for d in dtypes:
            r = reference_target(models[d], prompts[:args.prompts], args)
            ok2 = r["outside_share"] < OUTSIDE_FORWARD_MAX_SHARE
            ok3 = r["speedup"] >= REFERENCE_MIN_SPEEDUP and r["identical"] == r["prompts"]
            if 2 in args.targets:
                failed |= not ok2
                print(f"  [2] {verdict(ok2)} {r['dtype']:<9} outside the forward "
                      f"{100 * r['outside_share']:.2f}% of wall time (timed SPD ops "
                      f"{100 * r['ops_share']:.2f}% of forward + ops); forward "
                      f"{r['forward_ms']:.1f} ms mean, TPF {r['tpf']:.2f}")
            if 3 in args.targets:
                failed |= not ok3
                print(f"  [3] {verdict(ok3)} {r['dtype']:<9} {r['fast_tokens_per_s']:.1f} vs "
                      f"{r['ref_tokens_per_s']:.1f} tokens/s = {r['speedup']:.2f}x; identical "
                      f"tokens {r['identical']}/{r['prompts']}")
    if 4 in args.targets:
        print(f"\n[4] batch {BATCH} (different prompt lengths) >= {BATCH8_MIN_SPEEDUP}x the "
              "tokens/s of batch 1")
        for d in dtypes:
            r = batch_target(models[d], prompts[:BATCH], args)
            ok = r["speedup"] >= BATCH8_MIN_SPEEDUP and r["as_alone"] == r["batch"]
            failed |= not ok
            print(f"  {verdict(ok)} {r['dtype']:<9} batch {r['batch']} {r['batch_tokens_per_s']:.1f}"
                  f" vs alone {r['alone_tokens_per_s']:.1f} tokens/s = {r['speedup']:.2f}x "
                  f"(prompt lengths {r['prompt_lengths']}; batched nfe {r['nfe']}, "
                  f"tokens per batched forward {r['tpf']:.2f}; sequences decoded as alone "
                  f"{r['as_alone']}/{r['batch']})")
            print(f"      the rolling schedule: {r['rolling_tokens_per_s']:.1f} tokens/s = "
                  f"{r['rolling_speedup']:.2f}x; nfe {r['rolling_nfe']} (forwards "
                  f"{r['rolling_forwards']:.2f}x, mostly 2L tokens a row); sequences decoded as "
                  f"alone {r['rolling_as_alone']}/{r['batch']}")
            print(f"      on an H200 at TP 2, a projection (these decodes' forwards costed as "
                  f"llada2-mini's, gpu_projection.decode_ms): lockstep "
                  f"{r['gpu_lockstep_speedup']:.2f}x, rolling {r['gpu_rolling_speedup']:.2f}x "
                  f"the tokens/s of batch 1")
            print(f"      ceilings for this decode, any implementation: forwards "
                  f"{r['live_rows']:.2f}x (rows decoding per batched forward; rows starting "
                  f"their next block early: {r['scheduler_bound']:.2f}x), flops "
                  f"{r['flops_ceiling']:.2f}x "
                  f"(alone wall / {r['batched_gflop']:.0f} GFLOP at the best matmul "
                  f"rate measured, {r['peak_gflops']:.0f} GFLOP/s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
