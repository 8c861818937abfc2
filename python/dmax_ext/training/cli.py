"""`python -m dmax_ext train ...` and `python -m dmax_ext distill ...` (also under torchrun)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .oput import MODES, DiffusionConfig
from .trainer import TrainConfig

# Per-mode defaults of the objective: OPUT as the release; mdm covers every noise level.
MODE_NOISE = {"oput": (0.75, 0.75), "mdm": (0.0, 1.0)}


def add_train_command(subparsers) -> None:
    p = subparsers.add_parser("train", help="OPUT fine-tuning or masked-diffusion training",
                              description="Trains a LLaDA2-MoE model on a jsonl of "
                              "{prompt, response} or {messages} records (SPEC section 4).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint folder (HF layout) to start from")
    src.add_argument("--preset", help="random init from a preset name (tiny, llada2-small, ...) "
                     "or from a config.json path")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model's)")
    p.add_argument("--data", required=True, help="training jsonl")
    p.add_argument("--out", required=True, help="run folder: checkpoints, final/, train_log.jsonl")
    p.add_argument("--mode", choices=MODES, default="oput")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--noise-low", type=float, help="sigma range (default: oput 0.75..0.75, mdm 0..1)")
    p.add_argument("--noise-high", type=float)
    p.add_argument("--eos-label-tail", type=int, default=32)
    p.add_argument("--rollout-top-k", type=int, default=1)
    p.add_argument("--rollout-temperature", type=float, default=0.0)
    d = TrainConfig()
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    p.add_argument("--epochs", type=float, default=d.epochs)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--global-batch", type=int, default=d.global_batch)
    p.add_argument("--micro-batch", type=int, default=d.micro_batch)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard (under torchrun)")
    p.add_argument("--expert-bias-rate", type=float, default=d.expert_bias_rate,
                   help="aux-loss-free expert balancing step (0: off; use > 0 from scratch)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels: a resumed run matches an uninterrupted one bitwise")
    p.add_argument("--resume", default="auto",
                   help="auto (newest checkpoint in --out, if any), none, or a checkpoint folder")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=run_train)


def add_distill_command(subparsers) -> None:
    from ..cli import add_model_arguments
    from ..decoding import DEFAULT_BLOCK_LENGTH, DEFAULT_GEN_LENGTH
    p = subparsers.add_parser("distill", help="self-distillation: the model answers prompts",
                              description="Decodes the model's own answers to a jsonl of "
                              "{prompt} or {messages} records into training jsonl.")
    add_model_arguments(p)
    p.add_argument("--prompts", required=True, help="jsonl of {prompt} or {messages} records")
    p.add_argument("--out", required=True, help="training jsonl to write")
    p.add_argument("--mode", choices=("threshold", "spd"), default="threshold")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--gen-length", type=int, default=DEFAULT_GEN_LENGTH)
    p.add_argument("--block-length", type=int, default=DEFAULT_BLOCK_LENGTH)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=run_distill)


# -- train -----------------------------------------------------------------------------------------
def _init_distributed():
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: NCCL on GPUs, gloo on CPU. -> (device, group)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from ..distributed import init_tensor_parallel
        group, device = init_tensor_parallel()  # the one process-group set-up of the package
        return device, group
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return device, None


def build_model(args, device):
    from ..model import LLaDA2Config, load_model, random_model
    if args.model:
        model = load_model(args.model, device=device, dtype=torch.float32)
    else:
        preset = args.preset
        if Path(preset).suffix == ".json" or Path(preset).is_dir():
            preset = LLaDA2Config.from_json(preset)
        model = random_model(preset, device=device, dtype=torch.float32, seed=args.seed)
    if args.tokenizer:
        from transformers import AutoTokenizer
        model.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    if model.tokenizer is None:
        raise ValueError("no tokenizer: the model folder has none, pass --tokenizer DIR")
    return model


def train_config_from_args(args, config) -> TrainConfig:
    low, high = MODE_NOISE[args.mode]
    diffusion = DiffusionConfig(
        mode=args.mode, block_length=args.block_length,
        noise_low=low if args.noise_low is None else args.noise_low,
        noise_high=high if args.noise_high is None else args.noise_high,
        eos_label_tail=args.eos_label_tail, rollout_top_k=args.rollout_top_k,
        rollout_temperature=args.rollout_temperature,
        mask_id=config.mask_token_id, eos_id=config.eos_token_id)
    return TrainConfig(
        diffusion=diffusion, lr=args.lr, weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio, min_lr_ratio=args.min_lr_ratio, epochs=args.epochs,
        max_steps=args.max_steps, global_batch=args.global_batch, micro_batch=args.micro_batch,
        grad_clip=args.grad_clip, seed=args.seed, save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints, precision=args.precision,
        activation_checkpointing=args.activation_checkpointing, fsdp=args.fsdp,
        expert_bias_rate=args.expert_bias_rate, deterministic=args.deterministic,
        progress=not args.no_progress)


def run_train(args) -> int:
    device, group = _init_distributed()
    try:
        return _train(args, device, group)
    finally:  # the trainer (and its DDP / FSDP state) is out of scope here
        if group is not None:
            from ..distributed import shutdown_process_group
            shutdown_process_group()


def _train(args, device, group) -> int:
    from .data import load_training_data
    from .trainer import Trainer

    model = build_model(args, device)
    cfg = train_config_from_args(args, model.config)
    data = load_training_data(args.data, model.tokenizer, args.seq_len, model.config.eos_token_id)
    resume = None if args.resume == "none" else args.resume
    trainer = Trainer(model, data, cfg, args.out, resume=resume, process_group=group)
    if trainer.rank == 0:
        print(f"train: {len(data)} sequences of {data.seq_len} tokens ({data.n_dropped} too long, "
              f"dropped); {trainer.total_steps} steps of {cfg.global_batch}; world {trainer.world}"
              + (f"; resumed at step {trainer.step}" if trainer.step else ""), flush=True)
    last = trainer.train()
    final = trainer.save_final()
    if trainer.rank == 0:
        print(f"train: done at step {last['step']}, loss {last['loss']:.4f}; model in {final}")
    return 0


# -- distill ---------------------------------------------------------------------------------------
def run_distill(args) -> int:
    from ..cli import CommandError, load_model_from_args
    from .data import read_jsonl
    from .distill import distill_records, write_jsonl_atomic

    model = load_model_from_args(args)
    if model.tokenizer is None:
        raise CommandError(f"{args.model}: has no tokenizer files; distill needs one")
    records = read_jsonl(args.prompts)[:args.limit]
    out, counts = distill_records(model, model.tokenizer, records, gen_length=args.gen_length,
                                  block_length=args.block_length, threshold=args.threshold,
                                  mode=args.mode, batch_size=args.batch_size,
                                  progress=not args.no_progress)
    write_jsonl_atomic(args.out, out)
    print(f"distill: {counts['kept']} of {counts['prompts']} answers kept "
          f"({counts['no_eos']} without eos, {counts['masked']} with masks left); "
          f"TPF {counts['tokens'] / max(counts['nfe'], 1):.2f}; wrote {args.out}")
    return 0


