"""load_model / save_model / random_model: the HF layout, round trips, and every refusal."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import write_tiny_checkpoint
from dmax_ext.model import PRESETS, LLaDA2Config, load_model, random_model, save_model
from dmax_ext.model import loading

SHARD_1 = "model-00001-of-00002.safetensors"
SHARD_2 = "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


@pytest.fixture
def ckpt(tmp_path):
    return write_tiny_checkpoint(tmp_path / "ckpt")


def _edit_shard(ckpt, shard, edit, index_edit=None):
    tensors = load_file(str(ckpt / shard))
    edit(tensors)
    save_file(tensors, str(ckpt / shard), metadata={"format": "pt"})
    if index_edit:
        index = json.loads((ckpt / INDEX).read_text())
        index_edit(index["weight_map"])
        (ckpt / INDEX).write_text(json.dumps(index))


def _a_tensor_of(ckpt, shard):
    index = json.loads((ckpt / INDEX).read_text())
    return next(n for n, f in sorted(index["weight_map"].items()) if f == shard and "experts.3." in n)


def test_hf_layout(ckpt):
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", SHARD_1, SHARD_2, INDEX]
    index = json.loads((ckpt / INDEX).read_text())
    assert set(index["weight_map"].values()) == {SHARD_1, SHARD_2}
    assert "model.layers.2.mlp.experts.15.down_proj.weight" in index["weight_map"]
    assert index["metadata"]["total_size"] > 0
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model_type"] == "llada2_moe" and config["architectures"] == ["LLaDA2MoeModelLM"]
    assert config["mask_token_id"] == 511 and config["eos_token_id"] == 510


def test_load_round_trip_and_dtypes(ckpt, tmp_path):
    model = load_model(ckpt, dtype=torch.float32)
    assert model.tokenizer is None and model.config == PRESETS["tiny"].replace(torch_dtype="float32")
    on_disk = {**load_file(str(ckpt / SHARD_1)), **load_file(str(ckpt / SHARD_2))}
    state = model.state_dict()
    assert state.keys() == on_disk.keys()
    assert all(torch.equal(state[k], on_disk[k]) for k in state)
    again = load_model(save_model(model, tmp_path / "again", n_shards=1), dtype=torch.float32)
    assert (tmp_path / "again" / "model.safetensors").is_file()
    ids = torch.arange(10)[None]
    with torch.no_grad():
        torch.testing.assert_close(again(ids, block_length=4), model(ids, block_length=4), atol=0, rtol=0)
    bf16 = load_model(ckpt)
    assert bf16.dtype == torch.bfloat16
    assert bf16.model.layers[1].mlp.gate.expert_bias.dtype == torch.float32
    assert torch.equal(bf16.model.layers[1].mlp.gate.expert_bias, state["model.layers.1.mlp.gate.expert_bias"])


def test_save_is_atomic(ckpt, monkeypatch):
    before = sorted((p.name, p.stat().st_size) for p in ckpt.iterdir())
    model = load_model(ckpt, dtype=torch.float32)
    calls = []

    def failing_save_file(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(loading, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, ckpt, n_shards=2)
    assert sorted((p.name, p.stat().st_size) for p in ckpt.iterdir()) == before
    assert [p.name for p in ckpt.parent.iterdir()] == ["ckpt"]    # no temporary folder left


def test_not_llada2(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match=r"config\.json: not a LLaDA2-MoE checkpoint"):
        load_model(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_model(ckpt)


def test_invalid_config_values(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "mask_token_id": 512}))
    with pytest.raises(ValueError, match=r"config\.json: .*mask_token_id"):
        load_model(ckpt)
    with pytest.raises(ValueError, match="score_function"):
        LLaDA2Config(score_function="softmax")


def test_real_mini_config_parses_to_the_preset():
    real = {"architectures": ["LLaDA2MoeModelLM"], "auto_map": {"AutoConfig": "x.y"},
            "model_type": "llada2_moe", "dtype": "bfloat16", "rope_scaling": None,
            **{k: v for k, v in PRESETS["llada2-mini"].to_dict().items()
               if k not in ("mask_token_id", "eos_token_id", "torch_dtype", "architectures")}}
    config = LLaDA2Config.from_dict(real)
    assert config == PRESETS["llada2-mini"]
    assert (config.mask_token_id, config.eos_token_id) == (156895, 156892)
    assert config.to_dict()["auto_map"] == {"AutoConfig": "x.y"}     # unknown keys survive


def test_missing_tensor(ckpt):
    name = _a_tensor_of(ckpt, SHARD_2)
    _edit_shard(ckpt, SHARD_2, lambda t: t.pop(name), lambda m: m.pop(name))
    with pytest.raises(ValueError, match=f"lacks tensor '{name}'"):
        load_model(ckpt)


def test_tensor_missing_from_the_shard_the_index_names(ckpt):
    name = _a_tensor_of(ckpt, SHARD_2)
    _edit_shard(ckpt, SHARD_2, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=f"{SHARD_2}: lacks tensor '{name}'"):
        load_model(ckpt)


def test_unexpected_tensor(ckpt):
    extra = "model.layers.0.mlp.bias"
    _edit_shard(ckpt, SHARD_1, lambda t: t.update({extra: torch.zeros(3)}),
                lambda m: m.update({extra: SHARD_1}))
    with pytest.raises(ValueError, match=f"{SHARD_1}: unexpected tensor '{extra}'"):
        load_model(ckpt)


def test_tensor_in_a_shard_but_not_in_the_index(ckpt):
    name = _a_tensor_of(ckpt, SHARD_2)
    _edit_shard(ckpt, SHARD_1, lambda t: t.update({name: torch.zeros(32, 64)}))
    with pytest.raises(ValueError, match=f"{SHARD_1}: unexpected tensor '{name}' \\(not in the index"):
        load_model(ckpt)


def test_wrong_shape(ckpt):
    name = _a_tensor_of(ckpt, SHARD_2)
    _edit_shard(ckpt, SHARD_2, lambda t: t.update({name: t[name][:-1].clone()}))
    with pytest.raises(ValueError, match=f"{SHARD_2}: tensor '{name}' has shape"):
        load_model(ckpt)


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_corrupt_shard(ckpt, damage):
    data = (ckpt / SHARD_2).read_bytes()
    data = data[: len(data) - 100] if damage == "truncate" else b"\xff" * 16 + data[16:]
    (ckpt / SHARD_2).write_bytes(data)
    with pytest.raises(ValueError, match=f"{SHARD_2}: corrupt or truncated"):
        load_model(ckpt)


def test_index_points_to_missing_file(ckpt):
    (ckpt / SHARD_2).unlink()
    with pytest.raises(FileNotFoundError, match=f"{INDEX}: points to {SHARD_2}"):
        load_model(ckpt)
    (ckpt / INDEX).unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_model(ckpt)


def test_random_model_is_seeded_and_lm_head_gain_scales():
    a = random_model("tiny", dtype=torch.float32, seed=3)
    b = random_model("tiny", dtype=torch.float32, seed=3, lm_head_gain=10.0)
    assert torch.equal(a.model.layers[2].mlp.experts.gate_up_proj, b.model.layers[2].mlp.experts.gate_up_proj)
    torch.testing.assert_close(b.lm_head.weight, 10 * a.lm_head.weight)
    with pytest.raises(ValueError, match="preset"):
        random_model("huge")


def test_random_model_lm_head_from_embedding():
    a = random_model("tiny", dtype=torch.float32, seed=3)
    b = random_model("tiny", dtype=torch.float32, seed=3, lm_head_gain=5.0,
                     lm_head_from_embedding=True)
    mask = b.config.mask_token_id
    assert torch.equal(a.embedding_weight, b.embedding_weight)
    assert not b.lm_head.weight[mask].any()
    keep = torch.arange(b.config.vocab_size) != mask
    torch.testing.assert_close(b.lm_head.weight[keep], 5.0 * b.embedding_weight[keep])


def test_tokenizer_is_loaded_with_its_chat_template(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(500)} | {"<|endoftext|>": 510, "<|mask|>": 511}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>",
                                        mask_token="<|mask|>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    path = write_tiny_checkpoint(tmp_path / "ckpt", tokenizer=tokenizer)
    loaded = load_model(path, dtype=torch.float32).tokenizer
    assert loaded.encode("w3 w7", add_special_tokens=False) == [3, 7]
    assert loaded.eos_token_id == 510 and loaded.mask_token_id == 511
    assert loaded.apply_chat_template([{"role": "user", "content": "w5"}], tokenize=False) == "w5 "
