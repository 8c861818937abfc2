"""`python -m dmax_ext train` and `... distill` end to end on tiny models."""
import json

import pytest
import torch
from checkpoints import write_tiny_checkpoint
from training_fixtures import TINY_ARITH, arith_records, arith_tokenizer

from dmax_ext import cli
from dmax_ext.model import load_model


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_cli")
    arith_tokenizer(root / "tok")
    (root / "config.json").write_text(json.dumps(TINY_ARITH.to_dict()))
    with open(root / "data.jsonl", "w") as f:
        for r in arith_records(24):
            f.write(json.dumps(r) + "\n")
    return root


def train_args(root, *extra):
    return ["train", "--preset", str(root / "config.json"), "--tokenizer", str(root / "tok"),
            "--data", str(root / "data.jsonl"), "--out", str(root / "run"), "--mode", "mdm",
            "--seq-len", "64", "--block-length", "16", "--eos-label-tail", "16",
            "--max-steps", "2", "--global-batch", "4", "--micro-batch", "2", "--lr", "1e-3",
            "--save-every", "1", "--no-progress", *extra]


def test_train_writes_checkpoints_log_and_final_model_then_resumes(workdir, capsys):
    assert cli.main(train_args(workdir)) == 0
    run = workdir / "run"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-00000001",
                                                               "checkpoint-00000002"]
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["loss"] > 0 for r in log)
    model = load_model(run / "final", dtype=torch.float32)
    assert model.config.mask_token_id == TINY_ARITH.mask_token_id and model.tokenizer is not None
    out = capsys.readouterr().out
    assert "24 sequences of 64 tokens" in out and "2 steps of 4" in out

    assert cli.main(train_args(workdir, "--max-steps", "3")) == 0  # later flag wins
    assert "resumed at step 2" in capsys.readouterr().out
    assert len((run / "train_log.jsonl").read_text().splitlines()) == 3


def test_train_reports_a_corrupt_checkpoint(workdir, capsys):
    run = workdir / "run_corrupt"
    args = train_args(workdir, "--out", str(run))
    assert cli.main(args) == 0
    (run / "checkpoint-00000002" / "trainer_state" / "scheduler.pt").write_bytes(b"oops")
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "dmax_ext train: error: cannot resume from" in err and "corrupt checkpoint" in err


def test_train_needs_a_tokenizer(workdir, capsys):
    args = train_args(workdir)
    del args[3:5]  # --tokenizer DIR
    assert cli.main(args) == 2
    assert "no tokenizer" in capsys.readouterr().err


def test_distill_writes_the_models_own_answers(tmp_path, capsys):
    tok = arith_tokenizer(tmp_path / "tok")
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", config_overrides=TINY_ARITH.to_dict() | {
        "architectures": TINY_ARITH.architectures}, tokenizer=tok)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "1+2"}) + "\n"
                       + json.dumps({"messages": [{"role": "user", "content": "3-1"}]}) + "\n"
                       + json.dumps({"prompt": "4+4", "response": "old"}) + "\n")
    out = tmp_path / "distilled.jsonl"
    args = ["distill", "--model", str(ckpt), "--prompts", str(prompts), "--out", str(out),
            "--gen-length", "16", "--block-length", "8", "--threshold", "0.9", "--device", "cpu",
            "--dtype", "float32", "--no-progress"]
    assert cli.main(args) == 0
    summary = capsys.readouterr().out
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert f"distill: {len(records)} of 3 answers kept" in summary

    # A model whose logits are all equal predicts the lowest id, eos (0), everywhere: every
    # answer is empty and finished, so all three are kept, in order and in their own format.
    model = load_model(ckpt, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    from dmax_ext.model import save_model
    save_model(model, tmp_path / "eos_model")
    args[2] = str(tmp_path / "eos_model")
    assert cli.main(args) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == [{"prompt": "1+2", "response": ""},
                       {"messages": [{"role": "user", "content": "3-1"},
                                     {"role": "assistant", "content": ""}]},
                       {"prompt": "4+4", "response": ""}]


@pytest.mark.slow
def test_train_on_two_ranks_as_torchrun_launches_it(workdir, tmp_path, capfd):
    """Two local ranks with torchrun's environment (distributed.spawn_local): the CLI joins the
    gloo group, trains data-parallel, writes the final model from rank 0 and leaves the group
    (distributed.shutdown_process_group) before the process exits."""
    from dmax_ext.distributed import spawn_local
    args = [a if a != str(workdir / "run") else str(tmp_path / "run") for a in train_args(workdir)]
    assert spawn_local(cli.main, 2, args) == 0
    assert "world 2" in capfd.readouterr().out  # rank 0's summary: the two ranks trained together
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text()
           .splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert load_model(tmp_path / "run" / "final", dtype=torch.float32).tokenizer is not None
