"""`python -m dmax_ext generate`: answer one prompt with the model's chat template."""
from __future__ import annotations

import argparse

from .params import (DEFAULT_ACCEPT_THRESHOLD, DEFAULT_BLOCK_LENGTH, DEFAULT_GEN_LENGTH,
                     DEFAULT_THRESHOLD, DEFAULT_TOP_K, MAX_TOP_K, MODES)


def add_generate_command(subparsers) -> None:
    from ..cli import add_model_arguments
    p = subparsers.add_parser(
        "generate", help="decode an answer to one prompt",
        description="Applies the tokenizer's chat template to --prompt, decodes the answer and "
                    "prints it, then NFE (forwards, prefill included), TPF and tokens/s.")
    add_model_arguments(p, tensor_parallel=True)
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--gen-length", type=int, default=DEFAULT_GEN_LENGTH,
                   help="tokens to generate (rounded up to whole blocks)")
    p.add_argument("--block-length", type=int, default=DEFAULT_BLOCK_LENGTH)
    p.add_argument("--mode", choices=MODES, default="spd",
                   help="spd: soft parallel decoding; threshold: the hard-threshold baseline")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="promotion threshold tau_dec (threshold mode: the hard threshold)")
    p.add_argument("--accept-threshold", type=float, default=DEFAULT_ACCEPT_THRESHOLD,
                   help="SPD convergence threshold tau_acc")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K,
                   help=f"predictions mixed into a hybrid embedding (1..{MAX_TOP_K})")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (temperature > 0)")
    p.set_defaults(handler=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from ..cli import CommandError, load_model_from_args, run_tensor_parallel
    from ..model.tensor_parallel import tensor_parallel_rank
    from .engine import decode
    status = run_tensor_parallel(args)  # --tp N outside torchrun: N local ranks run this
    if status is not None:
        return status
    model = load_model_from_args(args)
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise CommandError(f"{args.model or 'the default model'} has no tokenizer files "
                           "(tokenizer.json, tokenizer_config.json)")
    if not getattr(tokenizer, "chat_template", None):
        raise CommandError("the model's tokenizer has no chat template")
    # The same rendering as the training data's prompts (one place: training.data).
    from ..training.data import encode_prompt
    prompt_ids = encode_prompt(tokenizer, [{"role": "user", "content": args.prompt}])
    out = decode(model, [prompt_ids], gen_length=args.gen_length,
                 block_length=args.block_length, threshold=args.threshold,
                 accept_threshold=args.accept_threshold, top_k=args.top_k,
                 temperature=args.temperature, mode=args.mode, seed=args.seed)
    if tensor_parallel_rank(model) != 0:  # every rank decoded the same tokens: rank 0 prints
        return 0
    tokens = out.tokens[0]
    answer = tokens[:-1] if tokens and tokens[-1] == model.config.eos_token_id else tokens
    print(tokenizer.decode(answer, skip_special_tokens=True))
    print(f"NFE {out.nfe}  TPF {out.tpf:.2f}  tokens/s {len(tokens) / out.wall_s:.1f}  "
          f"({len(tokens)} tokens in {out.wall_s:.2f} s, {model.device})")
    return 0
