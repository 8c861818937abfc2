"""The bundled default model (python/dmax_ext/assets/default_model): what the README's first command
decodes. It must load offline through the real loading code, match the task's tokenizer, and still
solve the task it was trained on (benchmarks/tradeoff.py: OPUT + SPD, docs/TRADEOFF.md)."""
import random

import pytest
import torch
from training_fixtures import arith_task as task

from dmax_ext import cli
from dmax_ext.decoding import decode
from dmax_ext.model import load_model
from dmax_ext.training.data import encode_prompt

MAX_BYTES = 20 * 2**20  # issue 5: the bundled model stays small


@pytest.fixture(scope="module")
def model():
    if not (cli.DEFAULT_MODEL_DIR / "config.json").is_file():
        pytest.fail(f"the bundled model is missing from {cli.DEFAULT_MODEL_DIR}")
    return load_model(cli.DEFAULT_MODEL_DIR, dtype=torch.float32)


def test_bundle_is_small_and_complete():
    files = {f.name: f.stat().st_size for f in cli.DEFAULT_MODEL_DIR.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert any(name.endswith(".safetensors") for name in files)
    assert sum(files.values()) <= MAX_BYTES


def test_tokenizer_matches_the_task(model):
    tok, cfg = model.tokenizer, model.config
    assert (cfg.eos_token_id, cfg.mask_token_id) == (task.EOS_ID, task.MASK_ID)
    text = task.solve("7-5+3+2-4", "op_first")[0]
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    # text outside the task's alphabet is dropped, as the README's prompt relies on
    assert tok.encode("What is 7-5+3+2-4?", add_special_tokens=False) == \
        tok.encode("7-5+3+2-4", add_special_tokens=False)


def test_solves_fresh_problems_with_spd(model):
    """Greedy SPD at the release's threshold on problems drawn here (not the held-out file):
    mostly valid worked solutions. The floor is far below TRADEOFF.md's accuracy: it catches a
    broken or wrong bundle, not a small regression."""
    rng = random.Random(1234)
    problems = [task.random_problem(rng) for _ in range(24)]
    prompts = [encode_prompt(model.tokenizer, [{"role": "user", "content": p}]) for p in problems]
    out = decode(model, prompts, gen_length=48, block_length=32, threshold=0.5, mode="spd")
    texts = [model.tokenizer.decode([t for t in toks if t != task.EOS_ID]) for toks in out.tokens]
    valid = sum(task.grade(p, t) for p, t in zip(problems, texts))
    assert all(toks and toks[-1] == task.EOS_ID for toks in out.tokens), texts
    assert valid >= len(problems) // 3, list(zip(problems, texts))
