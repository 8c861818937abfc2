"""DMAX_CPU_PREFETCH (csrc/cpu/vec/cpu_features.h): the weight-streaming CPU kernels
(skinny_linear, moe_experts) are instantiated for prefetcht1 and prefetchnta; the hint changes
no result (each form, bitwise), and a bad value is an error naming the variable."""
import pytest
import torch

from dmax_ext import ops
from cpu_flags import HAS_BF16_DOT
from test_moe_experts import _case

pytestmark = pytest.mark.skipif(not ops.has_op("moe_experts"),
                                reason="the native library predates these ops: rebuild")


def _both_hints(monkeypatch, run):
    outs = []
    for hint in ("t1", "nta"):
        monkeypatch.setenv("DMAX_CPU_PREFETCH", hint)
        outs.append(run())
    return outs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 32, 100])
def test_skinny_linear_same_under_either_hint(monkeypatch, dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=gen).to(dtype)
    w = torch.randn(300, 96, generator=gen).to(dtype)
    t1, nta = _both_hints(monkeypatch, lambda: ops.skinny_linear(x, w))
    assert torch.equal(t1, nta)


@pytest.mark.parametrize("dot", ["off", "on"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_experts_same_under_either_hint(monkeypatch, dot, dtype):
    if dot == "on" and (dtype != torch.bfloat16 or not HAS_BF16_DOT):
        pytest.skip("the dot-product form: bf16 on CPUs with AVX512-BF16")
    monkeypatch.setenv("DMAX_CPU_BF16_DOT", dot)
    x, ids, weights, gate_up, down = _case(24, 12, 160, 48, 4, dtype, seed=4)
    ids[ids == 11] = 10
    ids[0] = torch.tensor([0, 1, 2, 11])  # expert 11: one row (a wide strip), the others many
    t1, nta = _both_hints(monkeypatch, lambda: ops.moe_experts(x, ids, weights, gate_up, down))
    assert torch.equal(t1, nta)


def test_bad_value_is_an_error(monkeypatch):
    monkeypatch.setenv("DMAX_CPU_PREFETCH", "t0")
    x, w = torch.randn(4, 32), torch.randn(8, 32)
    with pytest.raises(RuntimeError, match="DMAX_CPU_PREFETCH must be auto, nta or t1, got 't0'"):
        ops.skinny_linear(x, w)
