"""The native ops the model runs (dmax_ext.ops: moe_experts, skinny_linear, rms_norm, ...) for a
decoding block's few rows without gradients: on the CPU all of them, on CUDA those with a CUDA
kernel (KERNEL_OPS). Imported lazily: the model itself does not need the native library, and
runs its torch formulations wherever a kernel does not apply."""
from __future__ import annotations

import functools
import os
import pathlib

import torch
from torch.nn.modules import module as nn_module


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where unknown). Which of a kernel and
    the GEMM library is faster depends on them: with AMX, oneDNN's bf16 GEMMs outrun the
    kernels' float32 FMA forms on larger calls."""
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def has_amx_bf16() -> bool:
    return "amx_bf16" in cpu_flags()


PACKED_EXPERTS_AUTO_MAX_BYTES = 256 * 2**20


def packs_expert_weights(nbytes: int) -> bool:
    """Whether a MoE layer's routed experts (nbytes of bfloat16 weights) should be read by the
    CPU kernel from a packed copy (ops.pack_moe_weights): only while the kernel runs bf16 dot
    products (torch.ops.dmax.cpu_bf16_dot: the CPU and DMAX_CPU_BF16_DOT), and as
    DMAX_CPU_PACKED_EXPERTS says, read at every call: "auto" (default) packs a layer of at most
    PACKED_EXPERTS_AUTO_MAX_BYTES (llada2-small's 24 MiB, not LLaDA2.0-mini's 1.5 GiB: the copy
    doubles the experts' memory), "on" any layer, "off" none."""
    mode = os.environ.get("DMAX_CPU_PACKED_EXPERTS", "auto") or "auto"
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"DMAX_CPU_PACKED_EXPERTS must be auto, on or off, got {mode!r}")
    if mode == "off" or (mode == "auto" and nbytes > PACKED_EXPERTS_AUTO_MAX_BYTES):
        return False
    ops = native_ops()
    return ops is not None and ops.has_op("cpu_bf16_dot") and torch.ops.dmax.cpu_bf16_dot()


def derived_copy(module: torch.nn.Module, slot: str, params: tuple[torch.Tensor, ...], make):
    """make(*params), kept in module.__dict__[slot] (no parameter or buffer: not in the state
    dict) and made again whenever a parameter's version counter or storage moves (an optimizer
    step, a load). A write through .data moves neither and is not seen, nor any in-place write
    to an inference tensor (made under inference_mode, e.g. a model loaded there), which has no
    version counter: only its storage is compared. Made outside inference mode, so that it is
    usable everywhere; for callers that want no gradient through it."""
    key = tuple((None if p.is_inference() else p._version, p.data_ptr()) for p in params)
    cached = module.__dict__.get(slot)
    if cached is None or cached[0] != key:
        with torch.inference_mode(False), torch.no_grad():
            cached = (key, make(*params))
        module.__dict__[slot] = cached
    return cached[1]


@functools.cache
def native_ops():
    """dmax_ext.ops (loading the native library), or None where it cannot be loaded."""
    try:
        from .. import ops
    except ImportError:
        return None
    return ops


# The native ops with a CUDA kernel beside the CPU one (csrc/kernels/): the model runs them on
# either device. The others are CPU variants (CpuVariant): on CUDA the model runs torch's ops.
KERNEL_OPS = frozenset({"rms_norm", "add_rms_norm", "qk_norm_rotary", "qk_norm_rotary_write_kv",
                        "swiglu", "moe_route", "moe_dispatch", "moe_combine", "step_tables",
                        "block_attention"})


@functools.cache
def has_device_kernel(name: str, device_type: str) -> bool:
    """Whether the loaded library binds torch.ops.dmax.<name> on `device_type` ("cuda": built
    with the CUDA kernels). False for a device type without a dispatch key of that name
    ("meta": the model then runs its torch formulation there)."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"dmax::{name}",
                                                              device_type.upper())
    except RuntimeError:  # "could not parse dispatch key"
        return False


def native_op(name: str, x: torch.Tensor, weight: torch.Tensor, max_rows: int | None = None):
    """torch.ops.dmax.<name> when it may serve x [..., H] with the parameter `weight`: no
    gradient wanted (the native ops have no autograd), the loaded library has the op, and on the
    CPU at most max_rows rows (None: any), on another device only an op of KERNEL_OPS that the
    library has a kernel of there; else None. The op itself, not dmax_ext.ops' wrapper: the
    model passes its own tensors, which need no Python argument checks (the C++ ops check
    shapes, dtypes and devices themselves: a bad call raises), and the wrappers' checks cost
    0.23 ms of a 8.3 ms bf16 block forward of llada2-small (docs/PERFORMANCE.md)."""
    on_cpu = x.device.type == "cpu"
    if on_cpu and max_rows is not None and x.numel() > max_rows * x.shape[-1]:
        return None
    if not on_cpu and name not in KERNEL_OPS:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return None
    ops = native_ops()  # loads the library and registers the ops' fake kernels
    if ops is None or not ops.has_op(name):
        return None
    if not on_cpu and not has_device_kernel(name, x.device.type):
        return None
    return getattr(torch.ops.dmax, name)


def runs_hooks(module: torch.nn.Module) -> bool:
    """Whether calling `module` runs forward hooks (its own, or global ones): a native form that
    does its work without calling it would skip them (tensor parallelism's all_reduce, a
    profiler's timers)."""
    return bool(module._forward_hooks or module._forward_pre_hooks
                or nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)


def hooks_output(module: torch.nn.Module) -> bool:
    """Whether a forward hook (its own, or a global one) sees `module`'s output: a caller that
    folds its own work into that output (DecoderLayer: the residual add into the MoE block's)
    must not then. Pre-hooks see only the inputs."""
    return bool(module._forward_hooks or nn_module._global_forward_hooks)


class CpuVariant:
    """Mixin of the modules with a native form beside their torch formulation. The CPU-only
    forms are what LLaDA2MoeModelLM.set_cpu_variants(False) turns off, all at once, so that the
    CPU then runs what CUDA runs and an op trace on it stands for a GPU step
    (benchmarks/step_ops.py); the forms of KERNEL_OPS stay, as CUDA runs them too."""

    cpu_variant = True

    def native(self, name: str, x: torch.Tensor, weight: torch.Tensor,
               max_rows: int | None = None):
        """native_op(...) while this module's CPU variant is on or the op has a CUDA kernel
        (KERNEL_OPS), else None."""
        if self.cpu_variant or name in KERNEL_OPS:
            return native_op(name, x, weight, max_rows)
        return None

    def runs_cuda_path(self, x: torch.Tensor) -> bool:
        """Whether this module, called on x, runs what CUDA runs: x on a GPU, or on the CPU with
        this module's variant off (standing for CUDA). The fused forms built for CUDA's launch
        count apply there; the CPU's own path keeps its tuned native forms."""
        return x.device.type != "cpu" or not self.cpu_variant
