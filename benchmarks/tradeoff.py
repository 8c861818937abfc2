"""Accuracy vs tokens per forward (TPF): the DMax trade-off, reproduced from scratch on CPU.

    python benchmarks/tradeoff.py --threads 1     # full run (~30 min on this 2-core CPU VM)
    python benchmarks/tradeoff.py --quick         # smoke run (~2 min), writes nothing to docs/

Stages (each caches its output in --run-dir, so a rerun resumes where the last one stopped):
  data     a checkable task (benchmarks/arith_task.py: multi-step arithmetic with worked steps,
           seeded), its character-level tokenizer, train / held-out splits
  base     a small LLaDA2-MoE (dense layer 0, grouped sigmoid routing, shared expert, partial
           rotary, GQA) trained from random init by our trainer in masked-diffusion mode
  distill  the base model answers training prompts (hard-threshold decoding): OPUT's data
  oput     OPUT fine-tuning of the base model on its own answers (SPEC section 4)
  eval     held-out accuracy and TPF: base + hard threshold, OPUT + SPD (and the two cross
           combinations) at each threshold
  report   docs/TRADEOFF.md (table) and docs/tradeoff.png (accuracy vs TPF)
  bundle   the OPUT model -> python/dmax_ext/assets/default_model (the README's default model)
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import arith_task as task  # noqa: E402

THRESHOLDS = (0.9, 0.7, 0.5, 0.3, 0.0)
# Rotary positions have no table: this is only the decoder's limit. Training covers positions
# < seq_len; the answers end with eos well before, so the CLI's default gen length (256) works.
MAX_POSITIONS = 512
# (model stage, decoding mode): the two the bar compares first, then the cross combinations.
COMBOS = (("base", "threshold"), ("oput", "spd"), ("base", "spd"), ("oput", "threshold"))
LABELS = {("base", "threshold"): "base + hard threshold", ("oput", "spd"): "OPUT + SPD",
          ("base", "spd"): "base + SPD", ("oput", "threshold"): "OPUT + hard threshold"}


@dataclass(frozen=True)
class Plan:
    seed: int = 0
    seq_len: int = 64
    block_length: int = 32
    gen_length: int = 48
    hidden: int = 128
    layers: int = 4
    n_train: int = 40000
    n_distill: int = 8000
    n_eval: int = 500
    base_steps: int = 3000
    base_lr: float = 1.5e-3
    oput_steps: int = 450
    oput_lr: float = 2e-4
    oput_noise: tuple[float, float] = (0.5, 1.0)
    batch: int = 32
    distill_threshold: float = 0.9
    distill_filter: bool = True      # keep only valid worked solutions
    decode_batch: int = 250


QUICK = Plan(hidden=64, layers=2, n_train=2000, n_distill=200, n_eval=60, base_steps=40,
             oput_steps=20, decode_batch=60, distill_filter=False)


def model_config(plan: Plan):
    from dmax_ext.model import LLaDA2Config
    h = plan.hidden
    return LLaDA2Config(
        vocab_size=task.VOCAB_SIZE, hidden_size=h, num_hidden_layers=plan.layers,
        intermediate_size=3 * h, num_attention_heads=4, num_key_value_heads=2, head_dim=h // 4,
        partial_rotary_factor=0.5, rope_theta=100.0, max_position_embeddings=MAX_POSITIONS,
        first_k_dense_replace=1, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=h // 2,
        num_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        pad_token_id=task.EOS_ID, eos_token_id=task.EOS_ID, mask_token_id=task.MASK_ID,
        torch_dtype="float32")


def log(msg: str) -> None:
    print(f"[tradeoff {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def done(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def mark_done(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


# -- stages ----------------------------------------------------------------------------------------
def stage_data(run: Path, plan: Plan) -> None:
    if done(run / "data" / "done.json"):
        return
    task.build_tokenizer(run / "tokenizer")
    train, held_out = task.make_splits(plan.n_train, plan.n_eval, plan.seed)
    data = run / "data"
    data.mkdir(parents=True, exist_ok=True)
    task.write_jsonl(data / "train.jsonl", task.training_records(train, plan.seed))
    task.write_jsonl(data / "distill_prompts.jsonl", ({"prompt": p} for p in train[:plan.n_distill]))
    task.write_jsonl(data / "eval.jsonl", ({"prompt": p, "answer": task.solve(p)[1]} for p in held_out))
    mark_done(data / "done.json", {"n_train": len(train), "n_eval": len(held_out)})


def train_stage(run: Path, name: str, plan: Plan, model, data_file: Path, mode: str) -> None:
    from dmax_ext.training import DiffusionConfig, TrainConfig, Trainer, load_training_data

    out = run / name
    if done(out / "done.json"):
        return
    tok = model.tokenizer
    data = load_training_data(data_file, tok, plan.seq_len, task.EOS_ID)
    low, high = (0.0, 1.0) if mode == "mdm" else plan.oput_noise
    cfg = TrainConfig(
        diffusion=DiffusionConfig(mode=mode, block_length=plan.block_length, noise_low=low,
                                  noise_high=high, eos_label_tail=plan.block_length,
                                  mask_id=task.MASK_ID, eos_id=task.EOS_ID),
        lr=plan.base_lr if mode == "mdm" else plan.oput_lr, weight_decay=0.01,
        warmup_ratio=0.03, min_lr_ratio=0.1, global_batch=plan.batch, micro_batch=plan.batch,
        max_steps=plan.base_steps if mode == "mdm" else plan.oput_steps, seed=plan.seed,
        save_every=50, keep_checkpoints=1, expert_bias_rate=1e-3 if mode == "mdm" else 0.0)
    trainer = Trainer(model, data, cfg, out, resume="auto")
    log(f"{name}: {len(data)} sequences, {trainer.total_steps} steps of {plan.batch}"
        + (f", resuming at step {trainer.step}" if trainer.step else ""))
    start = time.time()
    last = trainer.train()
    trainer.save_final()
    mark_done(out / "done.json", {"final_loss": last["loss"], "steps": trainer.total_steps,
                                  "seconds_this_run": round(time.time() - start, 1),
                                  "seconds": _train_seconds(out)})


def _train_seconds(out: Path) -> float:
    """Wall time over all runs of a stage, from the loss log (elapsed_s restarts per run)."""
    total, prev = 0.0, 0.0
    for line in (out / "train_log.jsonl").read_text().splitlines():
        t = json.loads(line)["elapsed_s"]
        total += t - prev if t >= prev else t
        prev = t
    return round(total, 1)


def stage_base(run: Path, plan: Plan) -> None:
    from dmax_ext.model import random_model
    from transformers import AutoTokenizer
    if done(run / "base" / "done.json"):
        return
    model = random_model(model_config(plan), dtype=torch.float32, seed=plan.seed)
    model.tokenizer = AutoTokenizer.from_pretrained(str(run / "tokenizer"), local_files_only=True)
    train_stage(run, "base", plan, model, run / "data" / "train.jsonl", "mdm")


def stage_distill(run: Path, plan: Plan, ops: str) -> None:
    from dmax_ext.model import load_model
    from dmax_ext.training.data import read_jsonl
    from dmax_ext.training.distill import distill_records, write_jsonl_atomic
    if done(run / "distill_done.json"):
        return
    model = load_model(run / "base" / "final", dtype=torch.float32)
    start = time.time()
    records, counts = distill_records(
        model, model.tokenizer, read_jsonl(run / "data" / "distill_prompts.jsonl"),
        gen_length=plan.gen_length, block_length=plan.block_length,
        threshold=plan.distill_threshold, mode="threshold", batch_size=plan.decode_batch, ops=ops)
    # Rejection filter: only valid worked solutions train the OPUT model (the paper leaves its
    # filtering unspecified; wrong answers would teach the model its own mistakes).
    correct = [r for r in records if task.grade(r["prompt"], r["response"])]
    write_jsonl_atomic(run / "distill.jsonl", correct if plan.distill_filter else records)
    styles = {style: sum(r["response"] == task.solve(r["prompt"], style)[0] for r in correct)
              for style in task.STYLES}
    counts.update(decoded=counts["kept"], correct=len(correct),
                  kept=len(correct) if plan.distill_filter else counts["kept"],
                  styles=styles, seconds=round(time.time() - start, 1))
    mark_done(run / "distill_done.json", counts)
    log(f"distill: {len(correct)} valid solutions of {counts['prompts']} prompts, "
        f"{counts['kept']} kept (styles of the valid ones: {styles})")


def stage_oput(run: Path, plan: Plan) -> None:
    from dmax_ext.model import load_model
    if done(run / "oput" / "done.json"):
        return
    model = load_model(run / "base" / "final", dtype=torch.float32)
    train_stage(run, "oput", plan, model, run / "distill.jsonl", "oput")


def stage_eval(run: Path, plan: Plan, ops: str, combos) -> list[dict]:
    from dmax_ext.decoding import decode
    from dmax_ext.model import load_model
    from dmax_ext.training.data import encode_prompt, read_jsonl
    from tqdm import tqdm

    problems = read_jsonl(run / "data" / "eval.jsonl")
    results, models = [], {}
    todo = [(m, mode, t) for m, mode in combos for t in THRESHOLDS]
    for stage, mode, threshold in tqdm(todo, desc="eval", dynamic_ncols=True):
        path = run / "eval" / f"{stage}-{mode}-{threshold}.json"
        if not done(path):
            if stage not in models:
                models[stage] = load_model(run / stage / "final", dtype=torch.float32)
            model = models[stage]
            prompts = [encode_prompt(model.tokenizer, [{"role": "user", "content": p["prompt"]}])
                       for p in problems]
            start, tokens, nfe, correct, answers, samples = time.time(), 0, 0, 0, 0, []
            for i in range(0, len(prompts), plan.decode_batch):
                out = decode(model, prompts[i:i + plan.decode_batch], gen_length=plan.gen_length,
                             block_length=plan.block_length, threshold=threshold, mode=mode, ops=ops)
                for p, toks, n in zip(problems[i:i + plan.decode_batch], out.tokens, out.seq_nfe):
                    tokens, nfe = tokens + len(toks), nfe + n
                    text = model.tokenizer.decode([t for t in toks if t != task.EOS_ID],
                                                  skip_special_tokens=False)
                    correct += task.grade(p["prompt"], text)
                    answers += task.final_answer(text) == p["answer"]
                    if len(samples) < 6:
                        samples.append({"prompt": p["prompt"], "response": text, "nfe": n})
            mark_done(path, {"model": stage, "mode": mode, "threshold": threshold,
                             "n": len(problems), "accuracy": 100.0 * correct / len(problems),
                             "answer_accuracy": 100.0 * answers / len(problems),
                             "samples": samples,
                             "tpf": tokens / max(nfe, 1), "nfe_per_problem": nfe / len(problems),
                             "seconds": round(time.time() - start, 1)})
        results.append(done(path))
    return results


# -- report ----------------------------------------------------------------------------------------
def bar_verdict(results: list[dict]) -> tuple[str, bool | None]:
    base = [r for r in results if (r["model"], r["mode"]) == ("base", "threshold")]
    oput = [r for r in results if (r["model"], r["mode"]) == ("oput", "spd")]
    if not base or not oput:
        return "incomplete", None
    best = max(base, key=lambda r: (r["accuracy"], r["tpf"]))
    close = [r for r in oput if r["accuracy"] >= best["accuracy"] - 2.0]
    if not close:
        top = max(oput, key=lambda r: r["accuracy"])
        return (f"base best: {best['accuracy']:.1f}% at TPF {best['tpf']:.2f} (threshold "
                f"{best['threshold']}); no OPUT + SPD point within 2 points (its best: "
                f"{top['accuracy']:.1f}% at TPF {top['tpf']:.2f})"), False
    fast = max(close, key=lambda r: r["tpf"])
    ratio = fast["tpf"] / best["tpf"]
    return (f"base best: {best['accuracy']:.1f}% at TPF {best['tpf']:.2f} (threshold "
            f"{best['threshold']}); OPUT + SPD: {fast['accuracy']:.1f}% at TPF {fast['tpf']:.2f} "
            f"(threshold {fast['threshold']}), {ratio:.2f}x the TPF"), ratio >= 2.0


def regime_note(results: list[dict]) -> list[str]:
    """Says whether the base model shows the regime DMax addresses: accuracy that collapses as
    the hard threshold drops (more tokens per forward)."""
    base = {r["threshold"]: r for r in results if (r["model"], r["mode"]) == ("base", "threshold")}
    if max(THRESHOLDS) not in base or min(THRESHOLDS) not in base:
        return []
    hi, lo = base[max(THRESHOLDS)], base[min(THRESHOLDS)]
    if lo["accuracy"] >= hi["accuracy"] - 2.0:
        return [f"Note: this base model does not lose accuracy when decoding in parallel "
                f"({lo['accuracy']:.1f}% at threshold {lo['threshold']}, TPF {lo['tpf']:.2f}, vs "
                f"{hi['accuracy']:.1f}% at {hi['threshold']}, TPF {hi['tpf']:.2f}): the regime DMax "
                "addresses (accuracy collapsing as the threshold drops) is not reproduced at this "
                "scale, so OPUT + SPD has no accuracy to recover and the bar compares against the "
                "base model's fastest setting."]
    return [f"The base model loses {hi['accuracy'] - lo['accuracy']:.1f} points from threshold "
            f"{hi['threshold']} (TPF {hi['tpf']:.2f}) to {lo['threshold']} (TPF {lo['tpf']:.2f})."]


def attribution_note(results: list[dict]) -> list[str]:
    """What the cross combinations say: how much of the gain the fine-tuned model brings with
    plain hard-threshold decoding, so that SPD's share is not overstated."""
    base = [r for r in results if (r["model"], r["mode"]) == ("base", "threshold")]
    cross = [r for r in results if (r["model"], r["mode"]) == ("oput", "threshold")]
    if not base or not cross:
        return []
    best = max(base, key=lambda r: (r["accuracy"], r["tpf"]))
    close = [r for r in cross if r["accuracy"] >= best["accuracy"] - 2.0]
    if not close:
        return ["", "The OPUT model with hard-threshold decoding stays below the base model's "
                "best accuracy at every threshold: at this scale the gain needs SPD."]
    fast = max(close, key=lambda r: r["tpf"])
    return ["", f"Cross-check: the OPUT model with plain hard-threshold decoding also keeps the "
            f"accuracy ({fast['accuracy']:.1f}% at TPF {fast['tpf']:.2f}, threshold "
            f"{fast['threshold']}): at this scale much of the gain comes from the self-distilled, "
            "OPUT-trained model itself (its answers settled on one style), not from SPD alone."]


def _distill_summary(run: Path) -> str:
    counts = done(run / "distill_done.json") or {}
    if "styles" not in counts:
        return "n/a"
    styles = ", ".join(f"{k} {v}" for k, v in counts["styles"].items())
    return (f"{counts['kept']} of {counts['prompts']}, {counts['correct']} valid, styles of the "
            f"valid ones {styles}")


def write_report(run: Path, plan: Plan, results: list[dict], docs: Path, seconds: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for combo, label in LABELS.items():
        pts = [r for r in results if (r["model"], r["mode"]) == combo]
        if not pts:
            continue
        style = "-o" if combo in COMBOS[:2] else ":."
        ax.plot([r["tpf"] for r in pts], [r["accuracy"] for r in pts], style, label=label)
        for r in pts:
            ax.annotate(f"{r['threshold']}", (r["tpf"], r["accuracy"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("tokens per forward (TPF)")
    ax.set_ylabel(f"accuracy on {plan.n_eval} held-out problems (%)")
    ax.set_title("Accuracy vs parallelism (labels: decoding threshold)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(docs / "tradeoff.png", dpi=120)
    plt.close(fig)

    verdict, passed = bar_verdict(results)
    cfg = model_config(plan)
    from dmax_ext.model import random_model
    n_params = sum(p.numel() for p in random_model(cfg, dtype=torch.float32).parameters())
    lines = [
        "# Accuracy vs tokens per forward: base model vs OPUT + SPD",
        "",
        "Written by `python benchmarks/tradeoff.py` (all numbers below come from that run; "
        "earlier designs of the task and why they were changed: "
        "[TRADEOFF_ATTEMPTS.md](TRADEOFF_ATTEMPTS.md)).",
        "",
        "Task: multi-step addition/subtraction with worked steps (benchmarks/arith_task.py), "
        "each step written operation first (`7-5=2`) or result first (`2=7-5`), "
        f"{task.STYLE_WEIGHTS[0]:.0%} / {task.STYLE_WEIGHTS[1]:.0%} of the training answers in "
        "each style; "
        f"{plan.n_eval} held-out problems; accuracy = valid worked solutions (every step a true "
        "equation in either style, then the right `#value`; `arith_task.grade`), the final "
        "value alone in its own column. "
        f"Model: LLaDA2-MoE architecture, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} "
        f"layers (layer 0 dense), {cfg.num_experts} experts (top {cfg.num_experts_per_tok}, "
        f"{cfg.n_group} groups) + 1 shared, {n_params / 1e6:.2f} M parameters, "
        f"character vocabulary of {cfg.vocab_size}, rope_theta {cfg.rope_theta:g} (the context "
        f"is {plan.seq_len} positions). Base: masked-diffusion training from scratch, "
        f"{plan.base_steps} steps x {plan.batch} sequences of {plan.seq_len}, lr {plan.base_lr:g}. "
        f"OPUT: {plan.oput_steps} steps x {plan.batch} (lr {plan.oput_lr:g}) on the base "
        f"model's own answers to {plan.n_distill} training prompts (threshold "
        f"{plan.distill_threshold} decoding; "
        + ("only its valid solutions kept: " if plan.distill_filter else "all kept: ")
        + f"{_distill_summary(run)}), noise {plan.oput_noise[0]}..{plan.oput_noise[1]}. "
        f"Decoding: block {plan.block_length}, gen length {plan.gen_length}; TPF = generated "
        "tokens (up to and including eos) / forwards, prefill included (SPEC section 5), "
        "summed over problems, each counted as if decoded alone.",
        "",
        "| model | decoding | threshold | accuracy (%) | final value right (%) | TPF | "
        "forwards / problem |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(f"| {r['model']} | {r['mode']} | {r['threshold']} | {r['accuracy']:.1f} | "
                     f"{r['answer_accuracy']:.1f} | {r['tpf']:.2f} | "
                     f"{r['nfe_per_problem']:.1f} |")
    status = {True: "met", False: "not met", None: "not evaluated"}[passed]
    lines += ["", *regime_note(results)]
    lines += ["", f"The bar (OPUT + SPD within 2 points of the base model's best accuracy, at "
              f"least 2x its TPF): **{status}**. {verdict}.", *attribution_note(results), "",
              "![accuracy vs TPF](tradeoff.png)", "",
              f"Stage wall times (torch threads: {torch.get_num_threads()}, on the 2-core CPU VM "
              "of docs/PERFORMANCE.md): " + ", ".join(
                  f"{k} {v / 60:.1f} min" for k, v in seconds.items())
              + f"; total {sum(seconds.values()) / 60:.1f} min."]
    (docs / "TRADEOFF.md").write_text("\n".join(lines) + "\n")
    log(f"report: {docs / 'TRADEOFF.md'}; bar {status}: {verdict}")


def stage_bundle(run: Path) -> None:
    """Copies the OPUT model (safetensors, config, tokenizer) into the package's assets."""
    target = REPO / "python" / "dmax_ext" / "assets" / "default_model"
    source = run / "oput" / "final"
    tmp = target.with_name(".default_model.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in source.iterdir():
        if f.is_file():
            shutil.copy2(f, tmp / f.name)
    task.build_tokenizer(tmp)  # the current tokenizer files (same ids as the run's)
    config = json.loads((tmp / "config.json").read_text())
    config["max_position_embeddings"] = max(config["max_position_embeddings"], MAX_POSITIONS)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    size = sum(f.stat().st_size for f in tmp.iterdir())
    if size > 20 * 2**20:
        shutil.rmtree(tmp)
        raise SystemExit(f"bundle: {size / 2**20:.1f} MB exceeds the 20 MB budget")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    log(f"bundle: {size / 2**20:.1f} MB -> {target}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", type=Path, default=REPO / "runs" / "tradeoff")
    p.add_argument("--quick", action="store_true", help="tiny sizes; report in the run dir")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--ops", default="native", choices=("native", "reference"))
    p.add_argument("--base-steps", type=int)
    p.add_argument("--oput-steps", type=int)
    p.add_argument("--no-bundle", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else Plan()
    plan = replace(plan, base_steps=args.base_steps or plan.base_steps,
                   oput_steps=args.oput_steps or plan.oput_steps)
    run = args.run_dir / ("quick" if args.quick else "full")
    run.mkdir(parents=True, exist_ok=True)
    (run / "plan.json").write_text(json.dumps(asdict(plan), indent=2) + "\n")
    seconds = {}
    for name, fn in (("data", lambda: stage_data(run, plan)), ("base", lambda: stage_base(run, plan)),
                     ("distill", lambda: stage_distill(run, plan, args.ops)),
                     ("oput", lambda: stage_oput(run, plan))):
        start = time.time()
        log(f"stage {name}")
        fn()
        seconds[name] = time.time() - start
    for name in ("base", "oput"):
        seconds[name] = done(run / name / "done.json")["seconds"]
    seconds["distill"] = done(run / "distill_done.json")["seconds"]
    start = time.time()
    log("stage eval")
    results = stage_eval(run, plan, args.ops, COMBOS)
    seconds["eval"] = sum(r["seconds"] for r in results)
    seconds.pop("data")
    write_report(run, plan, results, run if args.quick else REPO / "docs", seconds)
    if not args.quick and not args.no_bundle:
        stage_bundle(run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
