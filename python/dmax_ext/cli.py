"""`python -m dmax_ext COMMAND ...`: one argparse parser, one subcommand per job.

Each command's parser and handler live with the module that does the job; this file only lists
them (COMMANDS) and holds what commands share: the model options (--model, --device, --dtype;
tensor parallelism's --tp will join them here, in one place) and the error handling.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "default_model"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class CommandError(Exception):
    """A user-facing failure: printed as `dmax_ext COMMAND: error: ...`, exit status 2."""


def _command_adders():
    # The command modules, in help order: each adds its subparser(s) and sets `handler`.
    # Other modules append their adders here (e.g. training.cli: add_train_command, ...).
    from .decoding.cli import add_generate_command
    from .training.cli import add_distill_command, add_train_command
    return [add_generate_command, add_train_command, add_distill_command]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dmax_ext",
                                     description="DMax decoding and training for LLaDA2-MoE models")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in _command_adders():
        add_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args) or 0
    except (CommandError, ValueError, FileNotFoundError) as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 2


# -- shared model options ---------------------------------------------------------------------
def add_model_arguments(parser: argparse.ArgumentParser, tensor_parallel: bool = False) -> None:
    parser.add_argument("--model", type=Path, default=None,
                        help=f"checkpoint folder (default: the bundled model, {DEFAULT_MODEL_DIR})")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="weights' dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    if tensor_parallel:
        parser.add_argument("--tp", type=int, default=None, metavar="N",
                            help="tensor parallel over N ranks (GPUs cuda:0..N-1, or CPU "
                                 "processes with gloo): spawns N local processes; under "
                                 "`torchrun --nproc-per-node N` the default is N "
                                 "(docs/TENSOR_PARALLEL.md)")


def model_path_from_args(args: argparse.Namespace) -> Path:
    if args.model is not None:
        return args.model
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise CommandError(f"no --model given and the bundled default model is not installed "
                           f"at {DEFAULT_MODEL_DIR}; pass --model PATH (a LLaDA2-MoE checkpoint "
                           "folder)")
    return DEFAULT_MODEL_DIR


def load_model_from_args(args: argparse.Namespace):
    from .model import load_model
    path = model_path_from_args(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {args.device}: CUDA is not available on this machine")
    if tensor_parallel_size(args) > 1:
        from .distributed import init_tensor_parallel
        from .model.tensor_parallel import load_sharded_model
        group, device = init_tensor_parallel(device.type)  # cuda:LOCAL_RANK on GPUs
        return load_sharded_model(path, group, device=device, dtype=resolve_dtype(args.dtype, device))
    return load_model(path, device=device, dtype=resolve_dtype(args.dtype, device))


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype: "auto" is bfloat16 (the checkpoints' dtype) on CUDA, float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


# -- tensor parallelism (--tp) ----------------------------------------------------------------
def tensor_parallel_size(args: argparse.Namespace) -> int:
    """--tp, or torchrun's world size when --tp is not given; 1 for commands without --tp."""
    from .distributed import launched_world_size
    if not hasattr(args, "tp"):
        return 1
    launched = launched_world_size()
    if args.tp is None:
        return launched
    if args.tp < 1:
        raise CommandError(f"--tp must be >= 1, got {args.tp}")
    if launched > 1 and args.tp != launched:
        raise CommandError(f"--tp {args.tp}, but torchrun started {launched} processes")
    return args.tp


def run_tensor_parallel(args: argparse.Namespace) -> int | None:
    """With --tp N > 1 outside torchrun: runs the command on N spawned local ranks and returns
    its exit status. None: this process runs the command itself (one process, or one rank)."""
    from .distributed import launched_world_size, spawn_local
    from .model import LLaDA2Config
    from .model.tensor_parallel import check_tensor_parallel_size
    n = tensor_parallel_size(args)
    if n == 1 or launched_world_size() > 1:
        return None
    check_tensor_parallel_size(LLaDA2Config.from_json(model_path_from_args(args)), n)  # before spawning
    return spawn_local(_run_rank, n, args)


def _run_rank(args: argparse.Namespace) -> int:
    try:
        return args.handler(args) or 0
    except (CommandError, ValueError, FileNotFoundError) as e:
        if os.environ.get("RANK") == "0":  # the same error on every rank: say it once
            print(f"python -m dmax_ext {args.command}: error: {e}", file=sys.stderr)
        return 2
