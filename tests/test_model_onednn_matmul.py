"""onednn_matmul: float32 products and their gradients through oneDNN (training's projections,
router and grouped experts) against float64, entry by entry within the worst-case error of a
float32 dot product in any summation order; transposed and batched operands; groups without rows;
where it steps aside (other dtypes, autocast), and that the model's training forward uses it.

Why that bound and not the usual "2x a naive float32 computation": oneDNN's sums are ~2x less
accurate than MKL's blocked ones here, and a plain loop's error on one dot product is luck
(one output, 768 terms: oneDNN 7e-6, the loop 1e-6); the classic bound holds for every order."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from dmax_ext.model import onednn_matmul, random_model
from dmax_ext.model.moe import _experts_grouped, expert_counts

pytestmark = pytest.mark.skipif(onednn_matmul._onednn_linear() is None,
                                reason="this torch has no oneDNN linear")

UNIT_ROUNDOFF = 2.0**-24


def assert_within_dot_bound(got: torch.Tensor, a: torch.Tensor, b: torch.Tensor, what: str):
    """got (float32) = a @ b with a [..., M, K], b [K, N] (float64 copies are made here), each
    entry within gamma_K * (|a| @ |b|) of the exact product, gamma_K = K u / (1 - K u): the
    error bound of a float32 dot product of K terms summed in any order (Higham, 3.1)."""
    a, b = a.detach().double(), b.detach().double()
    k = a.shape[-1]
    gamma = k * UNIT_ROUNDOFF / (1 - k * UNIT_ROUNDOFF)
    exact, scale = a @ b, a.abs() @ b.abs()
    assert got.shape == exact.shape, what
    excess = (got.double() - exact).abs() - gamma * scale
    assert excess.max().item() <= 0 if excess.numel() else True, (
        f"{what}: an entry is {excess.max().item():.3g} past the bound")


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 300), inner=st.integers(1, 200), cols=st.integers(1, 200),
       lead=st.sampled_from([(), (2,), (2, 3)]), transposed=st.booleans(), seed=st.integers(0, 99))
def test_linear_and_its_gradients(rows, inner, cols, lead, transposed, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, rows, inner, generator=gen)
    w = torch.randn(cols, inner, generator=gen)
    if transposed:  # a transposed view of the weight (as backward passes them)
        w = torch.randn(inner, cols, generator=gen).t()
    x.requires_grad_(), w.requires_grad_()
    grad = torch.randn(*lead, rows, cols, generator=gen)
    out = onednn_matmul.linear(x, w)
    dx, dw = torch.autograd.grad(out, (x, w), grad)
    assert_within_dot_bound(out, x, w.t(), "out")
    assert_within_dot_bound(dx, grad, w, "dx")
    # dw sums over the rows of every lead index
    assert_within_dot_bound(dw, grad.reshape(-1, cols).t(), x.reshape(-1, inner), "dw")


@settings(max_examples=20, deadline=None)
@given(groups=st.integers(1, 9), inner=st.integers(1, 96), cols=st.integers(1, 96),
       seed=st.integers(0, 99))
def test_grouped_mm_and_its_gradients(groups, inner, cols, seed):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 80, (groups,), generator=gen)  # past ROWS_QUANTUM: both parts
    counts[torch.randint(0, groups, (1,), generator=gen)] = 0  # a group without rows
    xs = torch.randn(int(counts.sum()), inner, generator=gen).requires_grad_()
    w = torch.randn(groups, inner, cols, generator=gen).requires_grad_()
    grad = torch.randn(xs.shape[0], cols, generator=gen)
    out = onednn_matmul.grouped_mm(xs, w, counts)
    dxs, dw = torch.autograd.grad(out, (xs, w), grad)
    split = counts.tolist()
    for g, (x_g, out_g, grad_g, dx_g) in enumerate(zip(xs.split(split), out.split(split),
                                                       grad.split(split), dxs.split(split))):
        assert_within_dot_bound(out_g, x_g, w[g], f"out of group {g}")
        assert_within_dot_bound(dx_g, grad_g, w[g].t(), f"dxs of group {g}")
        # a group without rows gets an exact zero gradient (the bound: |0| <= 0)
        assert_within_dot_bound(dw[g], x_g.t(), grad_g, f"dw of group {g}")


def test_expanded_operands():
    """The gradient of a sum is an expanded tensor (zero strides), as is a broadcast input."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 64, generator=gen).expand(300, 64).requires_grad_()
    w = torch.randn(48, 64, generator=gen).requires_grad_()
    out = onednn_matmul.linear(x, w)
    dx, dw = torch.autograd.grad(out.sum(), (x, w))
    ones = torch.ones(300, 48)
    assert_within_dot_bound(out, x, w.t(), "out")
    assert_within_dot_bound(dx, ones, w, "dx")
    assert_within_dot_bound(dw, ones.t(), x, "dw")
    counts = torch.tensor([100, 0, 200])
    xs = torch.randn(300, 64, generator=gen).requires_grad_()
    groups = torch.randn(3, 64, 16, generator=gen).requires_grad_()
    dxs, dgroups = torch.autograd.grad(onednn_matmul.grouped_mm(xs, groups, counts).sum(),
                                       (xs, groups))
    assert_within_dot_bound(dxs[:100], torch.ones(100, 16), groups[0].t(), "dxs")
    assert_within_dot_bound(dgroups[2], xs[100:].t(), torch.ones(200, 16), "dw")


def test_where_it_steps_aside():
    x, w = torch.randn(5, 8), torch.randn(3, 8)
    assert onednn_matmul.applies(x, w)
    assert not onednn_matmul.applies(x.bfloat16(), w.bfloat16())  # oneDNN's bf16 GEMM already
    assert not onednn_matmul.applies(x.double(), w.double())
    groups = w.t().contiguous()[None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not onednn_matmul.applies(x, w)
        # autocast does not cast _grouped_mm; grouped_mm keeps float32 products too
        assert onednn_matmul.grouped_mm(x, groups, torch.tensor([5])).dtype == torch.float32
    assert onednn_matmul.grouped_mm(x.double(), groups.double(), torch.tensor([5])) is None
    for dtype in (torch.bfloat16, torch.float64):  # the torch op, same result
        a, b = x.to(dtype), w.to(dtype)
        torch.testing.assert_close(onednn_matmul.linear(a, b), F.linear(a, b), rtol=0, atol=0)
    assert onednn_matmul.linear(x[:0], w).shape == (0, 3)


class _Matmuls(TorchDispatchMode):
    """The matmul ops run, with the rows each one's left operand holds."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name == "aten.addmm_":  # grad_w[g].addmm_(x_rest^T, grad_rest): rows = inner size
            self.calls.append((name, args[1].shape[1]))
        elif name in ("aten.mm", "aten.addmm", "aten.linear", "aten._grouped_mm",
                      "mkldnn._linear_pointwise"):
            self.calls.append((name, args[1 if name == "aten.addmm" else 0].shape[0]))
        return func(*args, **(kwargs or {}))


def test_training_forward_runs_its_matmuls_through_onednn():
    """A gradient-taking forward and backward of the model: every projection and most of the
    grouped experts' rows go through oneDNN; MKL only takes groups' last rows (fewer than
    ROWS_QUANTUM), never a projection or _grouped_mm."""
    model = random_model("tiny", dtype=torch.float32, seed=1)
    ids = torch.randint(0, 500, (1, 200), generator=torch.Generator().manual_seed(0))
    with _Matmuls() as seen:
        model(ids, block_length=8).float().square().mean().backward()
    onednn = [rows for name, rows in seen.calls if name == "mkldnn._linear_pointwise"]
    others = [(name, rows) for name, rows in seen.calls if name != "mkldnn._linear_pointwise"]
    assert len(onednn) > 20
    assert all(name in ("aten.mm", "aten.addmm_") and rows < onednn_matmul.ROWS_QUANTUM
               for name, rows in others), others
    model.set_cpu_variants(False)  # what CUDA runs: torch's ops only
    with _Matmuls() as seen:
        model(ids, block_length=8).float().square().mean().backward()
    names = {name for name, _ in seen.calls}
    assert "mkldnn._linear_pointwise" not in names and "aten._grouped_mm" in names, names


def test_experts_grouped_uses_it_with_the_same_result_as_grouped_mm():
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 6, (150,), generator=gen)
    counts = expert_counts(ids.sort().values, 6)
    xs = torch.randn(150, 16, generator=gen)
    gate_up, down = torch.randn(6, 16, 24, generator=gen), torch.randn(6, 12, 16, generator=gen)
    offsets = counts.cumsum(0).to(torch.int32)
    hidden = torch._grouped_mm(xs, gate_up, offs=offsets)
    gate, up = hidden.chunk(2, -1)
    want = torch._grouped_mm(F.silu(gate) * up, down, offs=offsets)
    torch.testing.assert_close(_experts_grouped(xs, counts, gate_up, down), want,
                               rtol=1e-5, atol=1e-5)
