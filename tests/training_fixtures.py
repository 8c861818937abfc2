"""Small data and models for the training tests: the arithmetic task's character tokenizer and
a tiny LLaDA2-MoE whose special ids match it."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import arith_task  # noqa: E402

from dmax_ext.model import PRESETS, random_model  # noqa: E402
from dmax_ext.training.data import TokenizedData, tokenize_records  # noqa: E402

EOS, MASK = arith_task.EOS_ID, arith_task.MASK_ID
TINY_ARITH = PRESETS["tiny"].replace(vocab_size=arith_task.VOCAB_SIZE, pad_token_id=EOS,
                                     eos_token_id=EOS, mask_token_id=MASK,
                                     max_position_embeddings=128)


def arith_tokenizer(folder: Path):
    from transformers import AutoTokenizer
    arith_task.build_tokenizer(folder)
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def arith_records(n: int, seed: int = 0) -> list[dict]:
    train, _ = arith_task.make_splits(n, 1, seed)
    return [{"prompt": p, "response": arith_task.solve(p)[0]} for p in train]


def tiny_model(seed: int = 0, tokenizer=None):
    model = random_model(TINY_ARITH, dtype=torch.float32, seed=seed)
    model.tokenizer = tokenizer
    return model


def synthetic_data(n: int, seq_len: int, seed: int = 0) -> TokenizedData:
    """Token sequences with random prompt and response lengths (no tokenizer needed)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((n, seq_len), EOS, dtype=torch.int64)
    prompt_len = torch.randint(2, seq_len // 3, (n,), generator=g)
    end = torch.minimum(prompt_len + torch.randint(2, seq_len // 2, (n,), generator=g),
                        torch.tensor(seq_len))
    for i in range(n):
        # a learnable pattern: the response repeats the prompt's tokens
        prompt = torch.randint(5, 20, (int(prompt_len[i]),), generator=g)
        ids[i, :prompt_len[i]] = prompt
        span = int(end[i] - prompt_len[i])
        ids[i, prompt_len[i]:end[i] - 1] = prompt.repeat(span // len(prompt) + 1)[:span - 1]
    return TokenizedData(ids, prompt_len, end, 0, f"synthetic-{n}-{seq_len}-{seed}")


__all__ = ["EOS", "MASK", "TINY_ARITH", "arith_task", "arith_tokenizer", "arith_records",
           "tiny_model", "synthetic_data", "tokenize_records"]
