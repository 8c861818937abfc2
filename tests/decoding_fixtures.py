"""A tiny checkpoint with a tokenizer and a chat template, for the generate CLI and tps.py;
an eos id that stops a batch's sequences at different blocks, and a batch decode set up around
one; a record of the model's forwards."""
from __future__ import annotations

from pathlib import Path

from checkpoints import write_tiny_checkpoint

from dmax_ext.model import PRESETS

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")
# Word ids of the tokenizer below: "user : hello world assistant :" -> these.
HELLO_PROMPT_IDS = [1, 3, 4, 5, 2, 3]


def tiny_tokenizer(vocab_size: int, eos_id: int, mask_id: int):
    """Word level: the words of CHAT_TEMPLATE and "hello world", every other id "w<id>"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(vocab_size)}
    named = {0: "[UNK]", 1: "user", 2: "assistant", 3: ":", 4: "hello", 5: "world",
             eos_id: "<|endoftext|>", mask_id: "<|mask|>"}
    for i, word in named.items():
        del vocab[f"w{i}"]
        vocab[word] = i
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                        eos_token="<|endoftext|>", mask_token="<|mask|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def write_chat_checkpoint(path: Path) -> Path:
    """The tiny preset with peaked random predictions (blocks converge) and tiny_tokenizer."""
    c = PRESETS["tiny"]
    return write_tiny_checkpoint(path, lm_head_gain=200.0,
                                 tokenizer=tiny_tokenizer(c.vocab_size, c.eos_token_id,
                                                          c.mask_token_id))


def eos_in_different_blocks(tokens: list[list[int]], prompts, block_length: int) -> int:
    """A generated id first produced in different blocks by two sequences and never by a third:
    as the eos id it stops sequences at different blocks while another one goes on (decoding is
    the same up to it: the eos id only stops)."""
    for t in sorted({t for row in tokens for t in row}):
        blocks = {(len(p) + row.index(t)) // block_length
                  for p, row in zip(prompts, tokens) if t in row}
        if len(blocks) > 1 and any(t not in row for row in tokens):
            return t
    raise AssertionError("no such id: the test's premise does not hold")


def eos_case(prompts, block_length: int, **decode_kwargs):
    """The tiny model at lm_head gain 60 (blocks converge after 1 to block_length steps, some at
    the cap, differently per row), the decode arguments with an eos id from
    eos_in_different_blocks, and each prompt decoded alone with them: (model, kwargs, solo)."""
    import torch

    from dmax_ext.decoding import decode
    from dmax_ext.model import random_model
    model = random_model("tiny", dtype=torch.float32, lm_head_gain=60.0, seed=1)
    kwargs = dict(block_length=block_length, **decode_kwargs)
    kwargs["eos_id"] = eos_in_different_blocks(decode(model, prompts, **kwargs).tokens, prompts,
                                               block_length)
    return model, kwargs, [decode(model, [p], **kwargs) for p in prompts]


def record_forwards(model, monkeypatch) -> list[tuple[int, int | None]]:
    """From now on, (rows, n_logits) of every forward of the model (n_logits 0: a prefill)."""
    fed, forward = [], model.forward_cached

    def recording(cache, **kwargs):
        fed.append((kwargs["position_ids"].shape[0], kwargs.get("n_logits")))
        return forward(cache, **kwargs)
    monkeypatch.setattr(model, "forward_cached", recording)
    return fed
