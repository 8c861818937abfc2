"""float32 matmuls on the CPU through oneDNN, with gradients: the model's projections and routed
experts where the native kernels do not apply (training: the native kernels have no autograd;
without gradients they serve every row count, model/modules.py Linear.native_max_rows).

torch runs float32 matmuls on the CPU through MKL, and MKL takes its AVX2 code path on AMD CPUs:
on the AMD EPYC of docs/PERFORMANCE.md (2026-12-06 16:55, AVX-512, 1 thread) it reached 100-120
GFLOP/s at training's shapes where oneDNN (torch's bf16 GEMM library, reached through
torch.ops.mkldnn._linear_pointwise) reached 220-280, forward and both backward products alike,
transposed operands read in place. Where oneDNN is missing, under torch.compile, or with
tensor subclasses (FSDP's DTensor shards), the torch ops run as before; so does linear under
autocast (its bf16 matmuls are oneDNN's already), while grouped_mm keeps float32 products there,
as _grouped_mm does.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def _onednn_linear():
    available = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                                 "_linear_pointwise")
    return torch.ops.mkldnn._linear_pointwise.default if available else None


def _nt(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w[N, K]^T, either operand possibly a transposed view (read in place). An
    operand with a zero stride (expanded: the gradient of a sum) is copied first: oneDNN took
    a slow path on one, ~100x slower (a layer's experts, backward)."""
    x, w = (t.contiguous() if 0 in t.stride() else t for t in (x, w))
    return _onednn_linear()(x, w, None, "none", [], "")


def _onednn_operands(x: torch.Tensor, w: torch.Tensor, dtypes) -> bool:
    """x and w on the CPU, both of one of `dtypes`, plain tensors, outside torch.compile."""
    return (x.device.type == "cpu" and x.dtype in dtypes and w.dtype == x.dtype
            and type(x) is torch.Tensor and type(w.data) is torch.Tensor
            and not torch.compiler.is_compiling() and _onednn_linear() is not None)


def applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether linear(x, w) goes through oneDNN here: float32, not under autocast (whose bf16
    linear is oneDNN's already)."""
    return _onednn_operands(x, w, (torch.float32,)) and not torch.is_autocast_enabled("cpu")


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return _nt(x, w)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        grad_x = _nt(grad, w.t()) if ctx.needs_input_grad[0] else None
        grad_w = _nt(grad.t(), x.t()) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) without bias: x [..., K], w [N, K]."""
    if not applies(x, w) or x.numel() == 0:
        return F.linear(x, w)
    rows = x.reshape(-1, x.shape[-1])
    out = _Linear.apply(rows, w) if torch.is_grad_enabled() else _nt(rows, w)
    return out.view(*x.shape[:-1], w.shape[0])


ROWS_QUANTUM = 32  # oneDNN takes a multiple of this many of a group's rows (_GroupedMatmul)


class _GroupedMatmul(torch.autograd.Function):
    """xs [M, K] (rows sorted by group) @ w[g] [K, N] for the rows of group g.

    oneDNN makes a primitive per shape and caches it; the groups' row counts change at every
    call (a MoE layer's routing), and making primitives for new counts cost more than oneDNN's
    products saved (a training layer's experts on skewed routings: 84 ms with counts seen
    before, 125 ms with fresh ones; MKL's _grouped_mm 118). So oneDNN takes the largest
    multiple of ROWS_QUANTUM of each group's rows (a few dozen shapes, cached after the first
    steps) and MKL the rest (fewer than ROWS_QUANTUM rows; MKL makes nothing per shape).
    Padding the groups instead cost more in copies than it saved."""

    @staticmethod
    @torch.autocast("cpu", enabled=False)  # MKL's part in the operands' dtype, as oneDNN's
    def forward(ctx, xs, w, counts: list):
        ctx.save_for_backward(xs, w)
        ctx.counts = counts
        outs = [part for g, bulk, rest in _split_groups(xs, counts)
                for part in _products(bulk, rest, w[g], transposed=False)]
        return torch.cat(outs) if outs else xs.new_zeros(0, w.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad):
        xs, w = ctx.saved_tensors
        counts = ctx.counts
        grad_xs = grad_w = None
        if ctx.needs_input_grad[0]:
            parts = [part for g, bulk, rest in _split_groups(grad, counts)
                     for part in _products(bulk, rest, w[g], transposed=True)]
            grad_xs = torch.cat(parts) if parts else torch.zeros_like(xs)
        if ctx.needs_input_grad[1]:
            grad_w = torch.empty_like(w)
            for g, n in enumerate(counts):
                if not n:
                    grad_w[g].zero_()
            for (g, x_bulk, x_rest), (_, g_bulk, g_rest) in zip(_split_groups(xs, counts),
                                                                _split_groups(grad, counts)):
                if x_bulk.shape[0]:
                    grad_w[g] = _nt(x_bulk.t(), g_bulk.t())
                else:
                    grad_w[g].zero_()
                if x_rest.shape[0]:
                    grad_w[g].addmm_(x_rest.t(), g_rest)
        return grad_xs, grad_w, None


def _split_groups(rows: torch.Tensor, counts: list):
    """(group, its first rows in a multiple of ROWS_QUANTUM, the others) for each group with
    rows."""
    start = 0
    for g, n in enumerate(counts):
        if n:
            bulk = n - n % ROWS_QUANTUM
            yield g, rows[start:start + bulk], rows[start + bulk:start + n]
        start += n


def _products(bulk: torch.Tensor, rest: torch.Tensor, w_g: torch.Tensor, transposed: bool):
    """[bulk; rest] @ w_g (or @ w_g^T): the bulk through oneDNN, the rest through MKL."""
    if bulk.shape[0]:
        yield _nt(bulk, w_g if transposed else w_g.t())
    if rest.shape[0]:
        yield rest @ (w_g.t() if transposed else w_g)


def grouped_mm(xs: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor | None:
    """xs [M, K] sorted by group @ w [G, K, N], counts[g] rows of group g (int64 [G]): what
    torch._grouped_mm computes with offs = counts.cumsum, in float32 or bfloat16; None where
    oneDNN does not apply. Autocast does not cast _grouped_mm, and neither does this: under
    bf16 autocast training the experts' products stay float32 (casting the weights for bf16
    products cost about what those saved: PERFORMANCE.md, 2026-12-06 16:55)."""
    if not _onednn_operands(xs, w, (torch.float32, torch.bfloat16)):
        return None
    return _GroupedMatmul.apply(xs, w, counts.tolist())
