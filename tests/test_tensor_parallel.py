"""Tensor parallelism on CPU: two gloo ranks, spawned once for the module, against the
single-process model loaded from the same tiny HF-layout checkpoint (float32).

The ranks (`_rank_main`) load their slices, run every check's TP side and save the results;
the tests compare them with the single-process side computed here."""
import contextlib
import io
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from checkpoints import write_tiny_checkpoint
from decoding_fixtures import write_chat_checkpoint
from tolerances import assert_hybrid_embed_close, assert_probs_close

from dmax_ext import ops
from dmax_ext.decoding import decode
from dmax_ext.model import PRESETS, load_model

WORLD = 2
K = 4
PROMPTS = [[5, 9, 33, 101, 7, 7, 250, 12, 400, 3, 77], list(range(100, 119))]
DECODES = {
    "spd": dict(mode="spd", top_k=3),
    "threshold": dict(mode="threshold", threshold=0.3),
    "spd_sampled": dict(mode="spd", top_k=2, temperature=0.8, seed=7),
}


# -- inputs shared by both sides (deterministic) -----------------------------------------------
def _block_ids():
    return torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))


def _logits(vocab: int):
    """[2, 8, V] with ties: across ranks for the max (ids 5, 300), within a rank (260, 300), and
    across ranks inside the top-k (ids 40 and 400 share the 3rd place)."""
    x = 3 * torch.randn(2, 8, vocab, generator=torch.Generator().manual_seed(4))
    x[0, 0, [5, 300]] = 20.0
    x[0, 1, [260, 300]] = 20.0
    x[0, 2, [1, 2]], x[0, 2, [40, 400]] = torch.tensor([21.0, 20.5]), 20.0
    return x


def _hybrid_inputs(config):
    g = torch.Generator().manual_seed(5)
    mask = config.mask_token_id
    ids = torch.randint(0, config.vocab_size, (2, 8), generator=g)
    ids[0, :3] = mask
    active = torch.rand(2, 8, generator=g) < 0.8
    changed = torch.rand(2, 8, generator=g) < 0.5
    topk_ids = torch.randint(0, config.vocab_size, (2, 8, K), generator=g)
    topk_ids[1, 0] = torch.tensor([0, 255, 256, 511])  # the slices' edges
    topk_probs = torch.softmax(torch.randn(2, 8, K, generator=g), -1) * 0.9
    embeds = torch.randn(2, 8, config.hidden_size, generator=g)
    return embeds, ids, active, changed, topk_ids, topk_probs


# -- the ranks ---------------------------------------------------------------------------------
class _SliceReadSpy:
    """Wraps safetensors.safe_open: counts the elements read, and full-tensor reads."""

    def __init__(self, real_open):
        self.real_open, self.elements, self.whole = real_open, 0, []

    def __call__(self, *args, **kwargs):
        spy, handle = self, self.real_open(*args, **kwargs)

        class Shard:
            def __enter__(self):
                self.shard = handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def keys(self):
                return self.shard.keys()

            def get_tensor(self, name):
                spy.whole.append(name)
                return self.shard.get_tensor(name)

            def get_slice(self, name):
                real = self.shard.get_slice(name)

                class Slice:
                    def get_shape(self):
                        return real.get_shape()

                    def __getitem__(self, index):
                        t = real[index]
                        spy.elements += t.numel()
                        return t
                return Slice()
        return Shard()


def _generate_args(chat_ckpt: Path) -> list[str]:
    return ["generate", "--model", str(chat_ckpt), "--prompt", "hello world", "--gen-length",
            "8", "--block-length", "4", "--device", "cpu", "--dtype", "float32"]


def _rank_main(ckpt: Path, out_dir: Path) -> None:
    from dmax_ext import cli
    from dmax_ext.decoding.backends import NativeOps
    from dmax_ext.decoding.tensor_parallel_ops import TensorParallelOps
    from dmax_ext.distributed import init_tensor_parallel
    from dmax_ext.model import random_model
    from dmax_ext.model import tensor_parallel as tp

    group, _ = init_tensor_parallel("cpu")
    out = {}
    from dmax_ext.model import loading  # the shard reader both loaders use
    spy = loading.safe_open = _SliceReadSpy(loading.safe_open)
    model = tp.load_sharded_model(ckpt, group, dtype=torch.float32)
    out["read_elements"], out["whole_reads"] = spy.elements, spy.whole
    out["held_elements"] = sum(t.numel() for t in model.state_dict().values())
    loaded = {name: t.clone() for name, t in model.state_dict().items()}
    with torch.inference_mode():
        out["logits"] = model(input_ids=_block_ids(), block_length=8)
        rebuilt = tp.shard_model(load_model(ckpt, dtype=torch.float32), group)
        out["logits_shard_model"] = rebuilt(input_ids=_block_ids(), block_length=8)
        tp_ops = TensorParallelOps(NativeOps(), model)
        v0, v1 = model.tp_plan.vocab
        local = _logits(model.config.vocab_size)[..., v0:v1].contiguous()
        out["stats_greedy"] = tp_ops.logits_stats(local, K, 0.0, None)
        out["stats_sampled"] = tp_ops.logits_stats(local, K, 0.7, torch.tensor([11, 12]))
        embeds, *rest = _hybrid_inputs(model.config)
        tp_ops.hybrid_embed(embeds, model.embedding_weight, *rest, model.config.mask_token_id)
        out["hybrid"] = embeds
    for name, kwargs in DECODES.items():
        result = decode(model, PROMPTS, gen_length=16, block_length=8, **kwargs)
        out[name] = (result.tokens, result.nfe)
    model.set_cpu_variants(False)  # the ranks' GPU path: the kernel ops on sharded heads,
    model.set_moe_impl("grouped")  # widths and experts
    from dmax_calls import dmax_calls
    with dmax_calls() as calls:
        result = decode(model, PROMPTS, gen_length=16, block_length=8, **DECODES["spd"])
    out["gpu_path_spd"] = (result.tokens, result.nfe)
    out["gpu_path_ops"] = {name for name, _ in calls}
    # What decode picks for a batch on CUDA: the rolling schedule.
    result = decode(model, PROMPTS, gen_length=16, block_length=8, scheduler="rolling",
                    **DECODES["spd"])
    out["gpu_path_rolling"] = (result.tokens, result.seq_nfe, result.nfe)
    model.set_cpu_variants(True)
    model.set_moe_impl("auto")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # as under torchrun: WORLD_SIZE is set
        status = cli.main(_generate_args(ckpt.parent / "chat"))
    out["generate"] = (status, printed.getvalue())
    unseeded = decode(model, PROMPTS, gen_length=16, block_length=8, temperature=0.8)
    out["unseeded_sample"] = unseeded.tokens  # the seed is drawn once and shared: ranks agree
    out["weights_untouched"] = all(torch.equal(t, loaded[n]) for n, t in model.state_dict().items())
    try:
        tp.shard_model(random_model(PRESETS["tiny"].replace(num_attention_heads=3,
                                                            num_key_value_heads=1)), group)
    except ValueError as e:
        out["refusal"] = str(e)
    torch.save(out, out_dir / f"rank{dist.get_rank(group)}.pt")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from dmax_ext.distributed import spawn_local
    root = tmp_path_factory.mktemp("tp")
    ckpt = write_tiny_checkpoint(root / "ckpt", lm_head_gain=30.0)
    write_chat_checkpoint(root / "chat")
    assert spawn_local(_rank_main, WORLD, ckpt, root) == 0
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return ckpt, ranks, load_model(ckpt, dtype=torch.float32)


# -- the comparisons ---------------------------------------------------------------------------
def test_sharded_logits_equal_single_process(run):
    _, ranks, model = run
    with torch.inference_mode():
        want = model(input_ids=_block_ids(), block_length=8)
    for key in ("logits", "logits_shard_model"):
        got = torch.cat([r[key] for r in ranks], dim=-1)  # vocab slices, in rank order
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=key)


def test_ops_and_decoding_leave_the_weights_untouched(run):
    assert all(r["weights_untouched"] for r in run[1])


def test_each_rank_reads_only_its_slices(run):
    _, ranks, model = run
    full = sum(t.numel() for t in model.state_dict().values())
    for r in ranks:
        assert r["whole_reads"] == []
        assert r["read_elements"] == r["held_elements"] < 0.6 * full


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_vocab_parallel_logits_stats_equal_single_process(run, temperature):
    _, ranks, model = run
    logits = _logits(model.config.vocab_size)
    seeds = torch.tensor([11, 12]) if temperature else None
    want = ops.logits_stats(logits, K, temperature, seeds)
    key = "stats_sampled" if temperature else "stats_greedy"
    for r in ranks:
        pred, conf, topk_ids, topk_probs = r[key]
        assert torch.equal(pred, want[0]) and torch.equal(topk_ids, want[2])
        assert_probs_close(conf, logits, pred, "conf")
        assert_probs_close(topk_probs, logits, topk_ids, "topk_probs")
    assert want[2][0, 0, :2].tolist() == [5, 300] and want[2][0, 1, :2].tolist() == [260, 300]


def test_vocab_parallel_hybrid_embed_equals_single_process(run):
    _, ranks, model = run
    embeds, *rest = _hybrid_inputs(model.config)
    mask_id = model.config.mask_token_id
    want = embeds.clone()
    ops.hybrid_embed(want, model.embedding_weight, *rest, mask_id)
    ids, active = rest[0], rest[1]
    soft = active & (ids != mask_id)
    for r in ranks:
        assert torch.equal(r["hybrid"][~soft], want[~soft])  # hard rows and untouched ones
        assert_hybrid_embed_close(r["hybrid"], embeds, model.embedding_weight, *rest, mask_id)


@pytest.mark.parametrize("name", list(DECODES))
def test_decoded_tokens_equal_single_process(run, name):
    _, ranks, model = run
    want = decode(model, PROMPTS, gen_length=16, block_length=8, **DECODES[name])
    for r in ranks:
        assert r[name] == (want.tokens, want.nfe)


def test_the_gpu_path_decodes_as_one_process(run):
    """The sharded model as the ranks run it on CUDA (set_cpu_variants(False), the grouped MoE
    path: the kernel ops on each rank's heads, widths and experts, the KV cache written by
    qk_norm_rotary_write_kv) decodes the single process's tokens."""
    from dmax_ext.model.native import KERNEL_OPS
    _, ranks, model = run
    want = decode(model, PROMPTS, gen_length=16, block_length=8, **DECODES["spd"])
    for r in ranks:
        assert r["gpu_path_spd"] == (want.tokens, want.nfe)
        # (host write slots: the tables are torch's, as in any eager decode)
        assert KERNEL_OPS - {"qk_norm_rotary", "step_tables"} <= r["gpu_path_ops"]
        tokens, seq_nfe, nfe = r["gpu_path_rolling"]
        assert (tokens, seq_nfe) == (want.tokens, want.seq_nfe) and nfe <= want.nfe


def test_ranks_agree_on_an_unseeded_sample(run):
    assert run[1][0]["unseeded_sample"] == run[1][1]["unseeded_sample"]


def test_generate_command_on_tp_ranks_prints_what_one_process_prints(run, capsys):
    from dmax_ext import cli
    ckpt, ranks, _ = run
    assert cli.main(_generate_args(ckpt.parent / "chat")) == 0
    answer, counts = capsys.readouterr().out.rstrip("\n").split("\n")
    assert ranks[1]["generate"] == (0, "")  # rank 0 alone prints
    status, printed = ranks[0]["generate"]
    tp_answer, tp_counts = printed.rstrip("\n").split("\n")
    assert status == 0 and tp_answer == answer
    assert tp_counts.split("  tokens/s")[0] == counts.split("  tokens/s")[0]  # NFE and TPF
    assert cli.main(_generate_args(ckpt.parent / "chat") + ["--tp", "3"]) == 2
    assert "tensor parallel size 3 must divide num_attention_heads (4)" in capsys.readouterr().err


def test_tp_size_that_does_not_divide_the_heads_is_refused(run):
    _, ranks, _ = run
    for r in ranks:
        assert r["refusal"] == ("tensor parallel size 2 must divide num_attention_heads (3) "
                                "and num_key_value_heads (1)")
