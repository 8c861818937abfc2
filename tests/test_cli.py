"""`python -m dmax_ext generate` end to end on a tiny checkpoint with a word-level tokenizer."""
import subprocess
import sys

import pytest
import torch
from decoding_fixtures import HELLO_PROMPT_IDS, write_chat_checkpoint

from dmax_ext import cli
from dmax_ext.model import random_model, save_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_chat_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


ARGS = ["--prompt", "hello world", "--gen-length", "6", "--block-length", "4", "--device", "cpu"]


def test_generate_prints_answer_and_counts(checkpoint, capsys):
    assert cli.main(["generate", "--model", str(checkpoint), *ARGS]) == 0
    answer, counts = capsys.readouterr().out.rstrip("\n").split("\n")
    assert answer.strip() and "<|mask|>" not in answer
    assert counts.startswith("NFE ") and " TPF " in counts and " tokens/s " in counts


def test_generate_matches_decode(checkpoint, capsys):
    from dmax_ext.decoding import decode
    from dmax_ext.model import load_model
    model = load_model(checkpoint, dtype=torch.float32)
    out = decode(model, [HELLO_PROMPT_IDS], gen_length=6, block_length=4, mode="threshold")
    assert cli.main(["generate", "--model", str(checkpoint), *ARGS, "--mode", "threshold",
                     "--dtype", "float32"]) == 0
    answer, counts = capsys.readouterr().out.rstrip("\n").split("\n")
    tokens = [t for t in out.tokens[0] if t != model.config.eos_token_id]
    assert answer == model.tokenizer.decode(tokens, skip_special_tokens=True)
    assert counts.startswith(f"NFE {out.nfe}  TPF {out.tpf:.2f}  ")


def test_python_dash_m_end_to_end(checkpoint):
    run = subprocess.run([sys.executable, "-m", "dmax_ext", "generate", "--model", str(checkpoint),
                          *ARGS], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "NFE " in run.stdout.splitlines()[-1]


@pytest.mark.parametrize("extra, message", [
    (["--threshold", "1.5"], "threshold must be in [0, 1]"),
    (["--top-k", "9"], "top_k must be in 1..8"),
    (["--gen-length", "0"], "gen_length must be >= 1"),
])
def test_generate_bad_arguments(checkpoint, capsys, extra, message):
    assert cli.main(["generate", "--model", str(checkpoint), *ARGS, *extra]) == 2
    assert message in capsys.readouterr().err


def test_missing_model_and_tokenizer(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "DEFAULT_MODEL_DIR", tmp_path / "absent")
    assert cli.main(["generate", *ARGS]) == 2
    assert "bundled default model is not installed" in capsys.readouterr().err
    save_model(random_model("tiny", dtype=torch.float32), tmp_path / "bare")
    assert cli.main(["generate", "--model", str(tmp_path / "bare"), *ARGS]) == 2
    assert "has no tokenizer" in capsys.readouterr().err
    assert cli.main(["generate", "--model", str(tmp_path / "nowhere"), *ARGS]) == 2
    assert "nowhere" in capsys.readouterr().err
