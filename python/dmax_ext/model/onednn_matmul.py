"""float32 matmuls on the CPU through oneDNN, with gradients: the model's projections and routed
experts where the native kernels do not apply (training, long prefills).

torch runs float32 matmuls on the CPU through MKL, and MKL takes its AVX2 code path on AMD CPUs:
on the AMD EPYC of docs/PERFORMANCE.md (2026-12-06 17:20, AVX-512, 1 thread) it reached 100-120
GFLOP/s at training's shapes where oneDNN (torch's bf16 GEMM library, reached through
torch.ops.mkldnn._linear_pointwise) reached 220-280, forward and both backward products alike,
transposed operands read in place. Where oneDNN is missing, under autocast (its bf16 matmuls
are oneDNN's already), torch.compile, or with tensor subclasses (FSDP's DTensor shards), the
torch ops run as before.
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
    """x [M, K] @ w[N, K]^T, either operand possibly a transposed view."""
    return _onednn_linear()(x, w, None, "none", [], "")


def applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
            and type(x) is torch.Tensor and type(w.data) is torch.Tensor
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and _onednn_linear() is not None)


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


class _GroupedMatmul(torch.autograd.Function):
    """xs [M, K] (rows sorted by group) @ w[g] [K, N] for the rows of group g."""

    @staticmethod
    def forward(ctx, xs, w, counts: list):
        ctx.save_for_backward(xs, w)
        ctx.counts = counts
        outs = [_nt(chunk, w[g].t()) for g, chunk in _groups(xs, counts)]
        return torch.cat(outs) if outs else xs.new_zeros(0, w.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        xs, w = ctx.saved_tensors
        grad_xs = grad_w = None
        if ctx.needs_input_grad[0]:
            parts = [_nt(chunk, w[g]) for g, chunk in _groups(grad, ctx.counts)]
            grad_xs = torch.cat(parts) if parts else torch.zeros_like(xs)
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros_like(w)
            for (g, x_g), (_, grad_g) in zip(_groups(xs, ctx.counts), _groups(grad, ctx.counts)):
                grad_w[g] = _nt(x_g.t(), grad_g.t())
        return grad_xs, grad_w, None


def _groups(rows: torch.Tensor, counts: list):
    """(group, its rows) for each group with rows."""
    start = 0
    for g, n in enumerate(counts):
        if n:
            yield g, rows[start:start + n]
        start += n


def grouped_mm(xs: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor | None:
    """xs [M, K] sorted by group @ w [G, K, N], counts[g] rows of group g (int64 [G]): what
    torch._grouped_mm computes with offs = counts.cumsum; None where oneDNN does not apply."""
    if not applies(xs, w):
        return None
    return _GroupedMatmul.apply(xs, w, counts.tolist())
