"""benchmarks/roofline.py, step_ops.py and gpu_projection.py: the counts follow the config, the
routing recorder sees every MoE layer, the docs section is replaced in place."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import gpu_projection  # noqa: E402
import roofline  # noqa: E402
import step_ops  # noqa: E402
from dmax_ext.model.presets import preset_config  # noqa: E402

TINY = preset_config("tiny")


def test_cost_follows_config_fields():
    c = TINY
    n_moe = roofline.moe_layer_count(c)
    distinct = list(range(1, n_moe + 1))
    cost = roofline.block_forward_cost(c, 8, 24, distinct, weight_bytes=4, expert_bytes=1)
    assert cost.bytes["lm_head"] == c.vocab_size * c.hidden_size * 4
    assert cost.bytes["experts"] == sum(distinct) * 3 * c.hidden_size * c.moe_intermediate_size
    kv_row = 2 * c.num_key_value_heads * c.head_dim * 4
    assert cost.bytes["kv_read"] == c.num_hidden_layers * (24 + 8) * kv_row
    assert cost.bytes["embedding"] == 8 * c.hidden_size * 4
    assert cost.flops["experts"] == n_moe * 2 * 8 * c.num_experts_per_tok * 3 * c.hidden_size \
        * c.moe_intermediate_size
    halved = roofline.block_forward_cost(c, 8, 24, distinct, weight_bytes=4, expert_bytes=1, tp=2)
    assert halved.bytes["attention"] == cost.bytes["attention"] / 2
    assert halved.bytes["router"] == cost.bytes["router"]  # replicated


def test_cost_rejects_bad_arguments():
    with pytest.raises(ValueError, match="one count per MoE layer"):
        roofline.block_forward_cost(TINY, 8, 0, [1])
    with pytest.raises(ValueError, match="tp"):
        roofline.block_forward_cost(TINY, 8, 0, tp=3)


def test_expected_distinct_experts_limits():
    k, e = TINY.num_experts_per_tok, TINY.num_experts
    assert roofline.expected_distinct_experts(TINY, 1) == pytest.approx(k)
    assert roofline.expected_distinct_experts(TINY, 10_000) == pytest.approx(e)
    assert roofline.expected_distinct_experts(TINY, 4, e // 2) < \
        roofline.expected_distinct_experts(TINY, 4)


def test_floor_is_the_larger_time():
    assert roofline.floor_ms(2e9, 1e9, 1e9, 1e12) == pytest.approx(2000.0)
    assert roofline.floor_ms(1.0, 5e12, 1e9, 1e12) == pytest.approx(5000.0)


def test_routing_recorder_one_count_per_moe_layer():
    distinct = roofline.recorded_routing("tiny", 16, 16, torch.float32)
    assert len(distinct) == roofline.moe_layer_count(TINY)
    assert all(TINY.num_experts_per_tok <= d <= TINY.num_experts for d in distinct)


def test_matmul_measurement_runs():
    assert roofline.measure_matmul_gflops(8, 16, 16, torch.float32, repeats=1,
                                          min_sample_s=0.001) > 0


def test_the_floor_takes_the_fastest_matmul_measured():
    """The library's shapes and our kernel's (skinny_linear) are both measured; the floor's
    throughput is the larger, a given shape's is its own."""
    shapes = roofline.matmul_shapes(TINY, 8)
    kernel = f"{roofline.KERNEL_PREFIX}lm_head-8"
    assert shapes[kernel] == (8, TINY.hidden_size, TINY.vocab_size)
    small = {label: (8, 16, 16) for label in ("small-8", kernel)}
    rates = roofline.measure_matmul_rates(small, [torch.float32], repeats=1, min_sample_s=0.001)
    assert set(rates["float32"]) == set(small) and min(rates["float32"].values()) > 0
    machine = roofline.MachineRoofline(copy_gbps=1.0, shapes=shapes, threads=1, matmul_gflops={
        "float32": {"small-8": 50.0, "peak": 80.0, kernel: 120.0}})
    assert machine.flops_per_s(torch.float32) == 120e9
    assert machine.flops_per_s(torch.float32, "small-8") == 50e9


def test_step_ops_sees_the_four_step_ops_and_no_host_sync():
    counts = step_ops.count_step_ops()
    step = counts.ops_by_section["apply_step"]
    assert all(step[f"dmax.{name}.default"] == 1 for name in step_ops.STEP_OPS)
    per_unit = step_ops.per_unit_counts(counts)
    scaled = step_ops.scaled_counts(counts, preset_config("llada2-mini"))
    assert scaled["moe"] == round(per_unit["moe"] * 19)
    # The MoE counts rows per expert on the device (no torch.bincount): a later step has no sync.
    assert dict(counts.syncs) == {}


def test_step_ops_counts_the_kernel_ops_the_gpu_step_runs():
    """The GPU step (the CPU variants off) runs the ops with CUDA kernels: one dmax.rms_norm or
    add_rms_norm per RMSNorm, one qk_norm_rotary_write_kv per attention, one moe_route,
    moe_dispatch, moe_combine (with the layer's residual add) and two swiglu (routed and shared
    experts) per MoE layer, one block_attention per attention, one swiglu in the dense MLP, one step_tables a forward; none of
    their torch formulations' ops (sigmoid, topk, rsqrt, silu, argsort, cos) is left."""
    counts = step_ops.count_step_ops()
    units = step_ops.section_units(counts.config)
    names = counts.ops_by_section
    assert names["final_norm"] == {"dmax.rms_norm.default": 1}
    # per layer: the input norm, then the residual add and the post-attention norm as one op;
    # the residual add after the MLP is the MoE combine's (below), a torch add after a dense MLP
    assert names["residual_norms"] == {"dmax.rms_norm.default": units["residual_norms"],
                                       "dmax.add_rms_norm.default": units["residual_norms"]}
    assert names["dense_mlp"]["add.Tensor"] == units["dense_mlp"]
    assert "add.Tensor" not in names["moe"]
    # the cached step's prologue also writes the KV cache: no index_put_ of its own
    assert names["attention"]["dmax.qk_norm_rotary_write_kv.default"] == units["attention"]
    assert "index_put_.default" not in names["attention"]
    # the attention as one op whose output the dense projection reads as it is: no SDPA (on
    # CUDA its math path, given a bool mask and grouped heads), no transpose copy
    assert names["attention"]["dmax.block_attention.default"] == units["attention"]
    assert not {op for op in names["attention"] if "attention" in op and "dmax" not in op}
    assert "clone.default" not in names["attention"] and "_unsafe_view.default" not in names["attention"]
    for op in ("moe_route", "moe_dispatch", "moe_combine"):
        assert names["moe"][f"dmax.{op}.default"] == units["moe"]
    assert names["other"] == {"dmax.step_tables.default": 1}  # the per-forward tables
    assert names["moe"]["dmax.swiglu.default"] == 2 * units["moe"]
    assert names["dense_mlp"]["dmax.swiglu.default"] == units["dense_mlp"]
    replaced = {"sigmoid.default", "topk.default", "rsqrt.default", "silu.default",
                "pow.Tensor_Scalar", "mean.dim", "neg.default", "argsort.stable", "cos.default"}
    for section in ("residual_norms", "final_norm", "attention", "moe", "dense_mlp", "other"):
        assert not replaced & set(names[section]), (section, names[section])


def test_write_section_replaces_between_markers(tmp_path):
    doc = tmp_path / "PERFORMANCE.md"
    gpu_projection.write_section("SECTION-ONE\n", doc)
    text = doc.read_text()
    assert text.startswith("# Performance log") and "SECTION-ONE\n" in text
    doc.write_text(text.replace(gpu_projection.BEGIN, "## Log\nentry\n\n" + gpu_projection.BEGIN))
    gpu_projection.write_section("SECTION-TWO\n", doc)
    text = doc.read_text()
    assert "entry" in text and "SECTION-TWO\n" in text and "SECTION-ONE" not in text
    assert text.count(gpu_projection.BEGIN) == 1 and text.count(gpu_projection.END) == 1


def test_schedule_forward_feeds_twice_the_tokens_and_computes_one_block_of_logits():
    config = gpu_projection.preset_config(gpu_projection.PRESET)
    cost = roofline.block_forward_cost
    for batch in (1, 8):
        lock_bytes, lock_flops = gpu_projection.schedule_forward(config, 2, batch, 512, False)
        roll_bytes, roll_flops = gpu_projection.schedule_forward(config, 2, batch, 512, True)
        # a block's first step, but for the embedding rows: the current block comes as
        # embeddings (SPD), the previous one as ids
        first = cost(config, 64, 480, batch=batch, embedding_rows=32 * batch, tp=2)
        later = cost(config, 32, 512, batch=batch, embedding_rows=0, tp=2)
        assert (lock_bytes, lock_flops) == (later.total_bytes, later.total_flops)
        # ... and with the current block's logits only
        assert roll_flops == first.total_flops - first.flops["lm_head"] / 2
        assert roll_bytes == first.total_bytes - later.bytes["logits"]
        assert roll_flops > 1.5 * lock_flops and roll_bytes >= lock_bytes
