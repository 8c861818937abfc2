"""The trainer: loss falls, exact resume, refused checkpoints, frozen padding row, accumulation."""
import json
import shutil

import pytest
import torch
from training_fixtures import EOS, MASK, synthetic_data, tiny_model

from dmax_ext.training import CheckpointError, DiffusionConfig, TrainConfig, Trainer
from dmax_ext.training.checkpoint import STATE_DIR, latest_checkpoint


def config(mode="oput", **kw):
    d = dict(diffusion=DiffusionConfig(mode=mode, block_length=8, noise_low=0.3, noise_high=0.9,
                                       eos_label_tail=8, mask_id=MASK, eos_id=EOS),
             lr=3e-3, warmup_ratio=0.1, global_batch=8, micro_batch=4, max_steps=4,
             progress=False, expert_bias_rate=1e-3)
    d.update(kw)
    return TrainConfig(**d)


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_loss_falls_on_a_tiny_model(tmp_path):
    data = synthetic_data(32, 24)
    Trainer(tiny_model(), data, config("mdm", max_steps=20, global_batch=8, micro_batch=8),
            tmp_path).train()
    curve = losses(tmp_path)
    assert len(curve) == 20
    assert sum(curve[-5:]) / 5 < 0.8 * sum(curve[:5]) / 5


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def test_resume_is_identical_to_an_uninterrupted_run(tmp_path, deterministic):
    data = synthetic_data(16, 24)
    cfg = config(save_every=2, deterministic=True)
    straight = tiny_model(seed=0)
    Trainer(straight, data, config(deterministic=True), tmp_path / "a").train()

    first = tiny_model(seed=0)
    Trainer(first, data, cfg, tmp_path / "b").train(stop_after=3)  # "killed" after step 3
    assert latest_checkpoint(tmp_path / "b").name == "checkpoint-00000002"
    resumed_model = tiny_model(seed=7)  # different init: everything must come from the checkpoint
    resumed = Trainer(resumed_model, data, cfg, tmp_path / "b", resume="auto")
    assert resumed.step == 2
    resumed.train()
    a, b = weights(straight), weights(resumed_model)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert losses(tmp_path / "a") == losses(tmp_path / "b")  # step 3's first try was dropped


@pytest.fixture
def saved(tmp_path):
    data = synthetic_data(16, 24)
    Trainer(tiny_model(), data, config(max_steps=2), tmp_path).train()
    return data, latest_checkpoint(tmp_path)


def test_corrupt_checkpoint_is_refused(saved):
    data, ckpt = saved
    weights_file = ckpt / "model.safetensors"
    raw = bytearray(weights_file.read_bytes())
    raw[-3] ^= 0xFF
    weights_file.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt checkpoint.*model.safetensors.*sha256"):
        Trainer(tiny_model(), data, config(max_steps=2), ckpt.parent, resume=ckpt)


def test_truncated_state_file_is_refused(saved):
    data, ckpt = saved
    opt = ckpt / STATE_DIR / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt checkpoint.*optimizer.pt has 100 bytes"):
        Trainer(tiny_model(), data, config(max_steps=2), ckpt.parent, resume="auto")


def test_partial_checkpoint_is_refused(saved):
    data, ckpt = saved
    (ckpt / STATE_DIR / "state.json").unlink()
    with pytest.raises(CheckpointError, match="partial checkpoint.*state.json is missing"):
        Trainer(tiny_model(), data, config(max_steps=2), ckpt.parent, resume=ckpt)
    shutil.rmtree(ckpt / STATE_DIR)
    with pytest.raises(CheckpointError, match="partial checkpoint"):
        Trainer(tiny_model(), data, config(max_steps=2), ckpt.parent, resume=ckpt)


def test_missing_file_and_other_data_are_refused(saved):
    data, ckpt = saved
    with pytest.raises(CheckpointError, match="data_fingerprint"):
        Trainer(tiny_model(), synthetic_data(16, 24, seed=5), config(max_steps=2), ckpt.parent,
                resume=ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="partial checkpoint.*config.json is missing"):
        Trainer(tiny_model(), data, config(max_steps=2), ckpt.parent, resume=ckpt)


def test_fresh_run_refuses_a_folder_with_checkpoints(saved):
    data, ckpt = saved
    with pytest.raises(ValueError, match="already holds checkpoints"):
        Trainer(tiny_model(), data, config(max_steps=2), ckpt.parent)


def test_unfinished_save_is_never_resumed_from(saved):
    data, ckpt = saved
    (ckpt.parent / ".checkpoint-00000009.tmp-abcd" / "checkpoint").mkdir(parents=True)
    assert latest_checkpoint(ckpt.parent) == ckpt


def test_padding_row_gets_no_gradient(tmp_path):
    model = tiny_model()
    before = model.embedding_weight.detach().clone()
    Trainer(model, synthetic_data(16, 24), config(weight_decay=0.0, max_steps=3), tmp_path).train()
    after = model.embedding_weight.detach()
    assert torch.equal(after[EOS], before[EOS])
    assert not torch.equal(after[MASK], before[MASK])


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    data = synthetic_data(16, 24)
    one, two = tiny_model(), tiny_model()
    Trainer(one, data, config(micro_batch=8, max_steps=2), tmp_path / "one").train()
    Trainer(two, data, config(micro_batch=2, max_steps=2), tmp_path / "two").train()
    for (k, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


def test_batch_must_split_over_micro_batches(tmp_path):
    with pytest.raises(ValueError, match="global_batch"):
        Trainer(tiny_model(), synthetic_data(16, 24), config(micro_batch=3), tmp_path)


def test_activation_checkpointing_changes_nothing_but_memory(tmp_path):
    data = synthetic_data(16, 24)
    plain, ckpt = tiny_model(), tiny_model()
    Trainer(plain, data, config(max_steps=2), tmp_path / "plain").train()
    Trainer(ckpt, data, config(max_steps=2, activation_checkpointing=True), tmp_path / "ac").train()
    for (k, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


def test_expert_bias_moves_only_when_balancing(tmp_path):
    data = synthetic_data(16, 24)
    on, off = tiny_model(), tiny_model()
    Trainer(on, data, config("mdm", max_steps=2, expert_bias_rate=1e-2), tmp_path / "on").train()
    Trainer(off, data, config("mdm", max_steps=2, expert_bias_rate=0.0), tmp_path / "off").train()
    bias = [b for n, b in on.named_buffers() if n.endswith("expert_bias")]
    assert bias and all(b.abs().max() > 0 for b in bias)
    assert all(b.abs().max() == 0 for n, b in off.named_buffers() if n.endswith("expert_bias"))


@pytest.mark.parametrize("mode,copies", [("oput", 2), ("mdm", 1)])
def test_each_example_appears_once_per_flag_per_epoch(tmp_path, mode, copies):
    data = synthetic_data(12, 24)
    trainer = Trainer(tiny_model(), data, config(mode, global_batch=4, micro_batch=2), tmp_path)
    assert trainer.steps_per_epoch == 12 * copies // 4
    seen = []
    for step in range(trainer.steps_per_epoch):
        for batch in trainer._micro_batches(step):
            for clean, flag in zip(batch.clean, batch.flags):
                example = next(i for i in range(12) if torch.equal(data.ids[i], clean))
                seen.append((example, bool(flag)))
    if mode == "oput":
        assert sorted(seen) == sorted([(i, f) for i in range(12) for f in (True, False)])
    else:
        assert sorted(seen) == [(i, False) for i in range(12)]
