"""Building blocks shared by the layers: Linear, RMSNorm, partial rotary, the SwiGLU MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import onednn_matmul
from .native import CpuVariant, derived_copy, has_amx_bf16, runs_hooks


class Linear(CpuVariant, nn.Linear):
    """The model's projections and lm_head: nn.Linear without bias (same parameter, same
    checkpoint name). A decoding block's few rows on the CPU without gradients run as
    dmax.skinny_linear, which reads the weight once in place where the GEMM library would repack
    it on every call (llada2-small, 32 rows, 1 thread, docs/PERFORMANCE.md: float32 lm_head 17 ->
    11 ms on a Xeon; bfloat16 lm_head 6.2 -> 2.9 ms there (AMX, the library GEMM swapped), 7.8 ->
    ~5.2-6 ms on an AMD EPYC (AVX512-BF16 dot products)). float16: no faster than F.linear, so
    not used.

    native_max_rows(dtype): the most rows the kernel takes (None: any, 0: never, float16). The
    kernel runs every row count, so a row's product is the same bits in any batch: the kernel
    computes each output row alone, in an order independent of the row count, and takes large
    calls in chunks of 128 rows at the library's rate (docs/PERFORMANCE.md, 2026-12-06 23:45;
    the caps of before, 128 rows in bf16 and 2048 in float32, switched a batch's larger calls
    to oneDNN, whose other roundings changed a bf16 decode with the batch: decoding's batch
    invariance, docs/ARCHITECTURE.md). On CPUs with AMX, bf16 products go to oneDNN's AMX GEMM
    past 64 rows as before (skinny_linear's bf16 form there is the library's too): no batch
    invariance promised there."""

    @staticmethod
    def native_max_rows(dtype: torch.dtype) -> int | None:
        if dtype == torch.float32:
            return None
        if dtype == torch.bfloat16:
            return 64 if has_amx_bf16() else None
        return 0

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def native_form(self, x: torch.Tensor):
        """dmax.skinny_linear where it serves x (the rows cap, no gradients, the CPU variant on),
        else None."""
        max_rows = self.native_max_rows(x.dtype)
        return None if max_rows == 0 else self.native("skinny_linear", x, self.weight, max_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        native = self.native_form(x)
        if native is not None:
            rows = native(x.reshape(-1, x.shape[-1]), self.weight)
            return rows.view(*x.shape[:-1], self.weight.shape[0])  # (-1 is ambiguous at 0 rows)
        # (the float32 GEMM with gradients, onednn_matmul, is a CPU variant too)
        return onednn_matmul.linear(x, self.weight) if self.cpu_variant else super().forward(x)


class RMSNorm(CpuVariant, nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def native_form(self, x: torch.Tensor):
        """dmax.rms_norm where it serves x (x in the weight's dtype, no gradients, the CPU
        variant on), else None: the 7 ops of rms_normalize as one."""
        return self.native("rms_norm", x, self.weight) if x.dtype == self.weight.dtype else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        native = self.native_form(x)
        if native is not None:
            return native(x, self.weight, self.eps)
        return rms_normalize(x, self.eps, self.weight)


def rms_normalize(x: torch.Tensor, eps: float, weight: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dim. Normalize in float32, cast back, *then* scale by weight
    (broadcast): the checkpoint was trained with this order, and scaling before the cast would
    round differently in bf16."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotary_inv_freq(rotary_dim: int, theta: float, device=None) -> torch.Tensor:
    """theta^(-2i/rotary_dim) for i < rotary_dim/2, float32."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float() / rotary_dim
    return 1.0 / (theta ** exponents)


def rotary_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape [B, T, rotary_dim]: computed in float32, cast to the activation dtype."""
    freqs = position_ids.float()[..., None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, head_dim]; rotate-half on the first rotary_dim dims, the rest pass through."""
    rotary_dim = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    first, second = x_rot.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


class GatedMLP(CpuVariant, nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Layer 0's dense MLP and the shared expert.

    Where gate and up would both run dmax.skinny_linear (a decoding block's rows on the CPU,
    without gradients) and carry no hooks, they run as one product with a copy of their weights
    stacked (`gate_up_weight`: bitwise the two products, as each output column is summed alone),
    and the activation as dmax.swiglu (rounded as F.silu(gate) * up): one projection and two
    ops fewer a call, with their outputs (docs/PERFORMANCE.md). The layer op
    (dmax.decoder_layer) runs the same."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size)
        self.up_proj = Linear(hidden_size, intermediate_size)
        self.down_proj = Linear(intermediate_size, hidden_size)

    def gate_up_weight(self) -> torch.Tensor:
        """[2I, H]: the gate projection's weight rows, then the up projection's, as the fused
        product reads them: a copy kept until either parameter changes (derived_copy)."""
        gate = self.gate_proj._parameters["weight"]
        up = self.up_proj._parameters["weight"]
        return derived_copy(self, "_gate_up", (gate, up), lambda g, u: torch.cat([g, u]))

    def fuses_gate_up(self, x: torch.Tensor) -> bool:
        """Whether silu(gate(x)) * up(x) runs on the fused native forms (the class doc)."""
        gate, up = self.gate_proj, self.up_proj
        return (self.cpu_variant and self.native("swiglu", x, gate.weight) is not None
                and gate.native_form(x) is not None and up.native_form(x) is not None
                and not runs_hooks(gate) and not runs_hooks(up))

    def fuses_on_kernel(self, x: torch.Tensor) -> bool:
        """Whether gate and up run as one F.linear over the stacked weights, then dmax.swiglu:
        where the projections are torch's own GEMMs (on CUDA, or on the CPU with its variants
        off, which stands for CUDA) and the swiglu kernel applies (no gradients, no hooks): two
        launches where four were (docs/PERFORMANCE.md, "GPU projections"). The stacked copy
        adds gate's and up's bytes to the memory (0.4% of LLaDA2.0-mini: its dense MLP and
        shared experts), not to a forward's reads."""
        gate, up = self.gate_proj, self.up_proj
        return (gate.runs_cuda_path(x) and up.runs_cuda_path(x)
                and self.native("swiglu", x, gate.weight) is not None
                and not runs_hooks(gate) and not runs_hooks(up))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fuses_gate_up(x):
            rows = x.reshape(-1, x.shape[-1])
            gate_up = torch.ops.dmax.skinny_linear(rows, self.gate_up_weight())
            hidden = torch.ops.dmax.swiglu(gate_up).view(*x.shape[:-1], -1)
        elif self.fuses_on_kernel(x):
            hidden = torch.ops.dmax.swiglu(F.linear(x, self.gate_up_weight()))
        else:
            hidden = F.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(hidden)
