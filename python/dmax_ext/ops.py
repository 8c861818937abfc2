"""The seam between Python and the native kernels: typed wrappers over torch.ops.dmax.*.

Every wrapper validates its arguments at this public boundary (naming the argument, what was
expected and what came) and calls the native op; the fake (meta) kernels registered here let the
ops run under torch.compile and CUDA-graph capture. Semantics: dmax_ext.reference (the executable
spec) and docs/ARCHITECTURE.md.
"""
from __future__ import annotations

import math

import torch

from ._native import load_ops

load_ops()

# ---- shared argument checks -------------------------------------------------------------------


def check_tensor(name: str, t, *, dtypes=None, ndim=None, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} (like the other inputs), got {t.device}")


def check_shape(name: str, t: torch.Tensor, shape) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


# ---- ops (one section per op) -----------------------------------------------------------------
# Each section adds its ops' fake kernels (shapes and dtypes only: torch.compile, CUDA graphs,
# opcheck) here; they are registered at the end of the module.
FAKE_KERNELS: dict = {}


# ---- promote / spd_update / hybrid_embed: one SPD step (SPEC section 3, steps 3-6) -------------

MAX_TOPK = 8  # the kernels' largest k (csrc/common/spd_checks.h)


def _check_same_device(device: torch.device, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"{name} must be on {device} (like the other inputs), got {t.device}")


def _check_unit_interval(name: str, value) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def _check_block(name: str, t, dtype: torch.dtype, shape) -> None:
    check_tensor(name, t, dtypes=(dtype,), ndim=len(shape))
    check_shape(name, t, shape)


def _check_topk_pair(topk_ids, topk_probs, B: int, L: int) -> int:
    """topk_ids int64 / topk_probs float32 [B, L, k] (logits_stats' outputs), 1 <= k <= 8: k."""
    check_tensor("topk_ids", topk_ids, dtypes=(torch.int64,), ndim=3)
    k = topk_ids.shape[2]
    if not 1 <= k <= MAX_TOPK:
        raise ValueError(f"k (the last dimension of topk_ids) must be in 1..{MAX_TOPK}, got {k}")
    check_shape("topk_ids", topk_ids, (B, L, k))
    _check_block("topk_probs", topk_probs, torch.float32, (B, L, k))
    return k


def _check_vocab_ids(name: str, t: torch.Tensor, vocab_size: int) -> None:
    # A value check reads the data (a device sync on CUDA): it is skipped under torch.compile and
    # while capturing a CUDA graph, where the native op's own guards are what remains.
    if t.numel() == 0 or not _may_read_values(t):
        return
    low, high = int(t.min()), int(t.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"{name} must hold ids in [0, {vocab_size}) (the rows of weight), "
                         f"got {bad}")


def promote(ids: torch.Tensor, conf: torch.Tensor, pred: torch.Tensor, threshold: float,
            mask_id: int, prefix: bool = True) -> torch.Tensor:
    """Which masked positions of each sequence take their prediction this step.

    ids, pred: int64 [B, L]; conf: float32 [B, L]; threshold in [0, 1] (compared in float32).
    prefix=True is SPD (SPEC section 3, step 3): the masked positions before the first masked one
    with conf < threshold, or the first masked one alone when that is empty. prefix=False is the
    hard-threshold baseline: masked positions with pred != mask_id and conf >= threshold, or when
    none reaches it those within 1e-5 of the best. Returns bool [B, L]
    (see dmax_ext.reference.promote_reference).
    """
    check_tensor("ids", ids, dtypes=(torch.int64,), ndim=2)
    _check_block("conf", conf, torch.float32, ids.shape)
    _check_block("pred", pred, torch.int64, ids.shape)
    _check_same_device(ids.device, conf=conf, pred=pred)
    _check_unit_interval("threshold", threshold)
    return torch.ops.dmax.promote(ids, conf, pred, float(threshold), int(mask_id), bool(prefix))


def spd_update(ids: torch.Tensor, active: torch.Tensor, promoted: torch.Tensor,
               pred: torch.Tensor, conf: torch.Tensor, accept_threshold: float, mask_id: int):
    """SPEC section 3, steps 4-5: update the block's ids and decide convergence, per sequence.

    ids, pred: int64 [B, L]; active, promoted: bool [B, L]; conf: float32 [B, L];
    accept_threshold in [0, 1]. Returns (new_ids int64 [B, L], changed bool [B, L],
    converged bool [B]) (see dmax_ext.reference.spd_update_reference).
    """
    check_tensor("ids", ids, dtypes=(torch.int64,), ndim=2)
    _check_block("active", active, torch.bool, ids.shape)
    _check_block("promoted", promoted, torch.bool, ids.shape)
    _check_block("pred", pred, torch.int64, ids.shape)
    _check_block("conf", conf, torch.float32, ids.shape)
    _check_same_device(ids.device, active=active, promoted=promoted, pred=pred, conf=conf)
    _check_unit_interval("accept_threshold", accept_threshold)
    return torch.ops.dmax.spd_update(ids, active, promoted, pred, conf, float(accept_threshold),
                                     int(mask_id))


def hybrid_embed(embeds: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor,
                 active: torch.Tensor, changed: torch.Tensor, topk_ids: torch.Tensor,
                 topk_probs: torch.Tensor, mask_id: int) -> None:
    """SPEC section 3, step 6: writes the next input embeddings into `embeds` in place.

    embeds [B, L, H] and weight [V, H]: the same dtype (float32, float16 or bfloat16), last
    dimension contiguous; ids (the new ids): int64 [B, L]; active, changed: bool [B, L];
    topk_ids int64 / topk_probs float32 [B, L, k], 1 <= k <= 8. Soft positions
    (active & ids != mask_id) get the norm-rescaled mix of their top-k rows and the mask row;
    other changed positions get weight[ids]; the rest are untouched
    (see dmax_ext.reference.hybrid_embed_reference). Eagerly, ids and topk_ids are checked to lie
    in [0, V), which reads them (a device sync on CUDA).
    """
    check_tensor("embeds", embeds, dtypes=(torch.float32, torch.float16, torch.bfloat16), ndim=3)
    B, L, H = embeds.shape
    check_tensor("weight", weight, dtypes=(embeds.dtype,), ndim=2)
    if weight.shape[1] != H:
        raise ValueError(f"weight must have shape (V, {H}) (H of embeds), "
                         f"got {tuple(weight.shape)}")
    for name, t in (("embeds", embeds), ("weight", weight)):
        if H > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension, "
                             f"got strides {t.stride()}")
    _check_block("ids", ids, torch.int64, (B, L))
    _check_block("active", active, torch.bool, (B, L))
    _check_block("changed", changed, torch.bool, (B, L))
    _check_topk_pair(topk_ids, topk_probs, B, L)
    _check_same_device(embeds.device, weight=weight, ids=ids, active=active, changed=changed,
                       topk_ids=topk_ids, topk_probs=topk_probs)
    V = weight.shape[0]
    if not 0 <= int(mask_id) < V:
        raise ValueError(f"mask_id must be in [0, {V}) (a row of weight), got {mask_id}")
    _check_vocab_ids("ids", ids, V)
    _check_vocab_ids("topk_ids", topk_ids, V)
    torch.ops.dmax.hybrid_embed(embeds, weight, ids, active, changed, topk_ids, topk_probs,
                                int(mask_id))


# The native ops return contiguous outputs, whatever the inputs' strides.
def _promote_fake(ids, conf, pred, threshold, mask_id, prefix):
    return ids.new_empty(ids.shape, dtype=torch.bool)


def _spd_update_fake(ids, active, promoted, pred, conf, accept_threshold, mask_id):
    return (ids.new_empty(ids.shape), ids.new_empty(ids.shape, dtype=torch.bool),
            ids.new_empty(ids.shape[:1], dtype=torch.bool))


def _hybrid_embed_fake(embeds, weight, ids, active, changed, topk_ids, topk_probs, mask_id):
    return None


FAKE_KERNELS.update(promote=_promote_fake, spd_update=_spd_update_fake,
                    hybrid_embed=_hybrid_embed_fake)


# ---- logits_stats / onpolicy_noise: softmax statistics of the logits, on-policy rollout --------
# NaN logits. A row with a NaN or +inf logit, or with only -inf logits, has no softmax. Both
# kernels (CPU and CUDA) mark such a row for free: its sum of exponentials is NaN (or 0), so they
# return conf = NaN and topk_probs = NaN there (ids stay in [0, V)). Turning that into an error
# means reading conf: free for CPU tensors, a stream synchronization for CUDA ones (once per
# decoding step, the thing CUDA graphs exist to avoid). Hence `validate`: None (the default)
# checks CPU results and trusts CUDA ones; True always checks; False never does. Under
# torch.compile and CUDA-graph capture no value is ever read.


def _may_read_values(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _check_topk_arg(k) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_TOPK:
        raise ValueError(f"k must be an int in 1..{MAX_TOPK}, got {k!r}")


def _check_temperature(temperature) -> None:
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not 0.0 <= float(temperature) < float("inf")):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")


def _check_seeds(seeds, batch: int, device: torch.device) -> None:
    if seeds is None:
        raise ValueError("seeds (int64 [B], one per sequence) are required when temperature > 0")
    check_tensor("seeds", seeds, dtypes=(torch.int64,), ndim=1, device=device)
    check_shape("seeds", seeds, (batch,))


def logits_stats(logits: torch.Tensor, k: int = 1, temperature: float = 0.0,
                 seeds: torch.Tensor | None = None, *, validate: bool | None = None):
    """Softmax statistics of every position's logits (SPEC section 3, step 2), in one pass.

    logits: [B, L, V] float32, float16 or bfloat16 (a non-contiguous tensor is copied first).
    p = softmax(logits) in float32; the temperature only changes how pred is chosen:
    temperature == 0: pred = argmax (lowest id on ties); temperature > 0: a Gumbel-max sample
    argmax_v(logit_v / T + g_v) with counter-based noise g = -log(-log(rng_uniform(seeds[b], l, v)))
    (seeds: int64 [B]; the same seeds give the same ids, on CPU and CUDA alike).
    Returns (pred int64 [B, L], conf = p[pred] float32 [B, L], topk_ids int64 [B, L, k],
    topk_probs float32 [B, L, k]): the k (1..8, <= V) largest p, descending, ranked by logit with
    the lowest id first on ties (see dmax_ext.reference.logits_stats_reference).
    A row with a NaN or +inf logit, or only -inf logits, has conf NaN; validate=True raises
    ValueError on it, validate=None does so for CPU tensors only (see the note above).
    """
    check_tensor("logits", logits, dtypes=(torch.float32, torch.float16, torch.bfloat16), ndim=3)
    B, L, V = logits.shape
    _check_topk_arg(k)
    if k > V:
        raise ValueError(f"k must be <= V = {V} (the last dimension of logits), got {k}")
    _check_temperature(temperature)
    if temperature > 0:
        _check_seeds(seeds, B, logits.device)
    if not logits.is_contiguous():
        logits = logits.contiguous()
    out = torch.ops.dmax.logits_stats(logits, k, float(temperature),
                                      seeds if temperature > 0 else None)
    if (not logits.is_cuda if validate is None else validate) and _may_read_values(out[1]):
        check_softmax_defined(out[1])
    return out


def check_softmax_defined(conf: torch.Tensor) -> None:
    """Raises ValueError naming the first position whose conf (logits_stats' second output) is
    NaN: a NaN or +inf logit, or only -inf logits, leave its softmax undefined. Reads conf (a
    device tensor: a host sync). One reduction when every row is fine, where isnan + any took
    two ops and a tensor: conf lies in [0, 1] unless NaN, so its sum is NaN exactly when one
    is."""
    if math.isnan(conf.sum().item()):
        b, l = (int(i) for i in torch.isnan(conf).nonzero()[0])
        raise ValueError(f"logits[{b}, {l}] has a NaN or +inf logit or only -inf logits: "
                         "its softmax is undefined")


def onpolicy_noise(noisy_ids: torch.Tensor, sample_flags: torch.Tensor, topk_ids: torch.Tensor,
                   topk_probs: torch.Tensor, temperature: float = 0.0,
                   seeds: torch.Tensor | None = None, *, mask_id: int,
                   vocab_size: int | None = None) -> torch.Tensor:
    """The on-policy rollout of OPUT (SPEC section 4, step 3): a new int64 [B, L] tensor.

    noisy_ids: int64 [B, L]; sample_flags: bool [B]; topk_ids int64 / topk_probs float32
    [B, L, k] (k in 1..8, from logits_stats). In samples with sample_flags[b], every position
    holding mask_id takes topk_ids[b, l, 0] (the release's argmax) when k == 1 or
    temperature == 0, else a draw over its k candidates with q_i proportional to p_i^(1/T),
    u = rng_uniform(seeds[b], l, 0) (seeds int64 [B] required then). Other positions keep their
    id (see dmax_ext.reference.onpolicy_noise_reference). With vocab_size, topk_ids and mask_id
    are checked to lie in [0, vocab_size) (reading topk_ids: a device sync on CUDA).
    """
    check_tensor("noisy_ids", noisy_ids, dtypes=(torch.int64,), ndim=2)
    B, L = noisy_ids.shape
    device = noisy_ids.device
    _check_block("sample_flags", sample_flags, torch.bool, (B,))
    k = _check_topk_pair(topk_ids, topk_probs, B, L)
    _check_same_device(device, sample_flags=sample_flags, topk_ids=topk_ids, topk_probs=topk_probs)
    _check_temperature(temperature)
    sample = temperature > 0 and k > 1
    if sample:
        _check_seeds(seeds, B, device)
    if isinstance(mask_id, bool) or not isinstance(mask_id, int):
        raise TypeError(f"mask_id must be an int, got {mask_id!r}")
    if vocab_size is not None:
        if not 0 <= mask_id < vocab_size:
            raise ValueError(f"mask_id must be in [0, {vocab_size}) (vocab_size), got {mask_id}")
        if topk_ids.numel() and _may_read_values(topk_ids):
            low, high = int(topk_ids.min()), int(topk_ids.max())
            if low < 0 or high >= vocab_size:
                raise ValueError(f"topk_ids must hold ids in [0, {vocab_size}) (vocab_size), "
                                 f"got {low if low < 0 else high}")
    return torch.ops.dmax.onpolicy_noise(noisy_ids, sample_flags, topk_ids, topk_probs,
                                         float(temperature), seeds if sample else None, mask_id)


def _logits_stats_fake(logits, k, temperature, seeds):
    torch._check(logits.dim() == 3, lambda: f"logits must be [B, L, V], got {logits.shape}")
    torch._check(1 <= k <= MAX_TOPK, lambda: f"k must be in 1..{MAX_TOPK}, got {k}")
    B, L, _ = logits.shape
    return (logits.new_empty((B, L), dtype=torch.int64),
            logits.new_empty((B, L), dtype=torch.float32),
            logits.new_empty((B, L, k), dtype=torch.int64),
            logits.new_empty((B, L, k), dtype=torch.float32))


def _onpolicy_noise_fake(noisy_ids, sample_flags, topk_ids, topk_probs, temperature, seeds,
                         mask_id):
    torch._check(noisy_ids.dim() == 2, lambda: f"noisy_ids must be [B, L], got {noisy_ids.shape}")
    return torch.empty_like(noisy_ids, memory_format=torch.contiguous_format)


FAKE_KERNELS.update(logits_stats=_logits_stats_fake, onpolicy_noise=_onpolicy_noise_fake)


# ---- spd_step: one SPD step of a running batch after its forward (CPU only) ---------------------

def spd_step(logits: torch.Tensor, ids: torch.Tensor, embeds: torch.Tensor, done: torch.Tensor,
             step: torch.Tensor, active: torch.Tensor, weight: torch.Tensor,
             seeds: torch.Tensor | None, k: int, temperature: float, threshold: float,
             accept_threshold: float, mask_id: int) -> None:
    """SPEC section 3 steps 2-6 for every running row, in place, as one CPU op: logits_stats
    (temperature > 0: seeds + step are this step's row seeds), promote (the prefix rule),
    spd_update, hybrid_embed; rows whose block has converged (done) keep their ids and
    embeddings; done |= converged; step += 1. The same as decoding.step.apply_step running the
    ops one by one (its reference: dmax_ext.reference.spd_step_reference), with one dispatch
    instead of ~8 (docs/PERFORMANCE.md, 2026-12-07). A NaN probability raises ValueError.

    logits [B, L, V] float; ids int64 / active bool [B, L]; embeds [B, L, H] and weight [V, H]
    (the embedding table) of one dtype; done bool [B]; step int64 []; seeds int64 [B] or None.
    ids, embeds, done and step are written. CPU tensors only: on CUDA the step runs the ops one
    by one, inside a CUDA graph."""
    B, L = _check_step_state(logits, ids, done, step, active, k, temperature, seeds)
    check_tensor("embeds", embeds, dtypes=(torch.float32, torch.float16, torch.bfloat16), ndim=3)
    check_shape("embeds", embeds, (B, L, embeds.shape[2]))
    check_tensor("weight", weight, dtypes=(embeds.dtype,), ndim=2)
    check_shape("weight", weight, (weight.shape[0], embeds.shape[2]))
    _check_same_device(logits.device, embeds=embeds, weight=weight)
    _check_unit_interval("threshold", threshold)
    _check_unit_interval("accept_threshold", accept_threshold)
    if not 0 <= int(mask_id) < weight.shape[0]:
        raise ValueError(f"mask_id must be in [0, {weight.shape[0]}) (a row of weight), "
                         f"got {mask_id}")
    _check_vocab_ids("ids", ids, weight.shape[0])
    torch.ops.dmax.spd_step(logits, ids, embeds, done, step, active, weight,
                            seeds if temperature > 0 else None, int(k), float(temperature),
                            float(threshold), float(accept_threshold), int(mask_id))


def threshold_step(logits: torch.Tensor, ids: torch.Tensor, done: torch.Tensor,
                   step: torch.Tensor, active: torch.Tensor, seeds: torch.Tensor | None, k: int,
                   temperature: float, threshold: float, mask_id: int) -> None:
    """The hard-threshold baseline's step (SPEC section 3) for every running row, in place, as
    one CPU op: logits_stats, promote anywhere (prefix=False), the promoted ids committed,
    converged when no active position is masked; converged rows (done) keep their ids;
    done |= converged; step += 1. decoding.step.threshold_step_composed runs the ops one by
    one (reference: dmax_ext.reference.threshold_step_reference). Arguments as spd_step's."""
    _check_step_state(logits, ids, done, step, active, k, temperature, seeds)
    _check_unit_interval("threshold", threshold)
    torch.ops.dmax.threshold_step(logits, ids, done, step, active,
                                  seeds if temperature > 0 else None, int(k), float(temperature),
                                  float(threshold), int(mask_id))


def _check_step_state(logits, ids, done, step, active, k, temperature, seeds) -> tuple[int, int]:
    """The arguments spd_step and threshold_step share: (B, L)."""
    check_tensor("logits", logits, dtypes=(torch.float32, torch.float16, torch.bfloat16), ndim=3)
    if logits.device.type != "cpu":
        raise ValueError(f"logits must be on the CPU (the step ops are CPU only), "
                         f"got {logits.device}")
    B, L, _ = logits.shape
    _check_block("ids", ids, torch.int64, (B, L))
    _check_block("active", active, torch.bool, (B, L))
    _check_block("done", done, torch.bool, (B,))
    _check_block("step", step, torch.int64, ())
    _check_same_device(logits.device, ids=ids, active=active, done=done, step=step)
    _check_topk_arg(k)
    _check_temperature(temperature)
    if temperature > 0:
        _check_seeds(seeds, B, logits.device)
    return B, L


def _spd_step_fake(logits, ids, embeds, done, step, active, weight, seeds, k, temperature,
                   threshold, accept_threshold, mask_id):
    return None


def _threshold_step_fake(logits, ids, done, step, active, seeds, k, temperature, threshold,
                         mask_id):
    return None


FAKE_KERNELS.update(spd_step=_spd_step_fake, threshold_step=_threshold_step_fake)


# ---- moe_experts: a MoE layer's routed experts for a decoding block (CPU only) -----------------


MOE_PACK_COLUMNS = 32  # the columns of a packed block: one 512-bit load of bf16 pairs


def moe_weights_packable(w: torch.Tensor) -> bool:
    """Whether pack_moe_weights takes w: bfloat16 [E, K, N] with K even and N a multiple of 32."""
    return (w.dtype == torch.bfloat16 and w.dim() == 3 and w.shape[1] % 2 == 0
            and w.shape[2] % MOE_PACK_COLUMNS == 0)


def _moe_weight_shape(name: str, w, dtype: torch.dtype, packed: bool) -> tuple[int, int, int]:
    """[E, K, N] of an expert weight given plain (3 dims) or packed (pack_moe_weights)."""
    check_tensor(name, w, dtypes=(dtype,), ndim=5 if packed else 3)
    if not packed:
        return tuple(w.shape)
    if w.dtype != torch.bfloat16:
        raise TypeError(f"{name}, packed, must be bfloat16 (the layout of its dot products), got "
                        f"{w.dtype}")
    e, blocks, pairs, cols, two = w.shape
    if cols != MOE_PACK_COLUMNS or two != 2:
        raise ValueError(f"{name}, packed, must be [E, N / {MOE_PACK_COLUMNS}, K / 2, "
                         f"{MOE_PACK_COLUMNS}, 2], got {tuple(w.shape)}")
    return (e, 2 * pairs, blocks * cols)


def pack_moe_weights(w: torch.Tensor) -> torch.Tensor:
    """A routed experts' weight [E, K, N] (gate_up [E, H, 2I] or down [E, I, H]) laid out for
    moe_experts' AVX512-BF16 dot products: [E, N / 32, K / 2, 32, 2], element [e, j // 32, k // 2,
    j % 32, k % 2] = w[e, k, j]. Each 32-column block is then one contiguous stream of (row k,
    row k + 1) pairs, as vdpbf16ps reads them: no shuffles in the kernel, and a stream the
    hardware prefetchers follow. The results are bitwise those of the unpacked weights. A new
    tensor (the caller keeps w: the torch paths and training read that). CPU only (a native
    kernel: the torch formulation, reference.pack_moe_weights_reference, is ~10x slower)."""
    check_tensor("w", w, dtypes=(torch.bfloat16,), ndim=3)
    if not moe_weights_packable(w):
        raise ValueError(f"w must be [E, K, N] with K even and N a multiple of {MOE_PACK_COLUMNS}, "
                         f"got {tuple(w.shape)}")
    if w.device.type != "cpu":
        raise ValueError(f"w must be on the CPU (moe_experts is CPU only), got {w.device}")
    return torch.ops.dmax.pack_moe_weights(w)


def _pack_moe_weights_fake(w):
    e, k, n = w.shape
    return w.new_empty((e, n // MOE_PACK_COLUMNS, k // 2, MOE_PACK_COLUMNS, 2))


def unpack_moe_weights(packed: torch.Tensor) -> torch.Tensor:
    """pack_moe_weights' inverse: [E, N / 32, K / 2, 32, 2] -> [E, K, N] (contiguous)."""
    shape = _moe_weight_shape("packed", packed, torch.bfloat16, packed=True)
    return packed.permute(0, 2, 4, 1, 3).reshape(shape)


def moe_experts(x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
                gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """sum_j expert_weights[n, j] * FFN_{expert_ids[n, j]}(x[n]) for every token n: [N, H].

    x [N, H] float32 / bfloat16 / float16; expert_ids int64 [N, k] in [0, E); expert_weights
    float32 [N, k]; gate_up [E, H, 2I] (x @ gate_up[e] = [gate | up]) and down [E, I, H] in x's
    dtype, or (bfloat16) both as pack_moe_weights lays them out; FFN = SwiGLU. The routed rows of
    each busy expert run as one GEMM pair that reads the expert's weights once, intermediates
    rounded to the model dtype as the torch formulation does (dmax_ext.model.moe, impl
    "reference"), float32 accumulation and weighted sum, cast once. CPU only, no autograd: the
    decoder's hot path (model/moe.py picks it)."""
    check_tensor("x", x, dtypes=(torch.float32, torch.bfloat16, torch.float16), ndim=2)
    check_tensor("expert_ids", expert_ids, dtypes=(torch.int64,), ndim=2)
    if expert_ids.shape[0] != x.shape[0]:
        raise ValueError(f"expert_ids must have shape ({x.shape[0]}, k) (N of x), got "
                         f"{tuple(expert_ids.shape)}")
    _check_block("expert_weights", expert_weights, torch.float32, expert_ids.shape)
    packed = isinstance(gate_up, torch.Tensor) and gate_up.dim() == 5
    n_experts, hidden, two_i = _moe_weight_shape("gate_up", gate_up, x.dtype, packed)
    if hidden != x.shape[1] or two_i % 2:
        raise ValueError(f"gate_up must have shape (E, {x.shape[1]}, 2I), got "
                         f"{(n_experts, hidden, two_i)}" + (" (packed)" if packed else ""))
    expected = (n_experts, two_i // 2, hidden)
    if _moe_weight_shape("down", down, x.dtype, packed) != expected:
        raise ValueError(f"down must have shape {expected}" + (" packed" if packed else "")
                         + f", got {tuple(down.shape)}")
    _check_same_device(x.device, expert_ids=expert_ids, expert_weights=expert_weights,
                       gate_up=gate_up, down=down)
    return torch.ops.dmax.moe_experts(x, expert_ids, expert_weights, gate_up, down)


def _moe_experts_fake(x, expert_ids, expert_weights, gate_up, down):
    return x.new_empty(x.shape)


def has_op(name: str) -> bool:
    """Whether the loaded native library has torch.ops.dmax.<name> (a library built before an op
    was added lacks it)."""
    return hasattr(torch.ops.dmax, name)


FAKE_KERNELS.update(moe_experts=_moe_experts_fake, pack_moe_weights=_pack_moe_weights_fake)


# ---- skinny_linear: a projection of a decoding block's few rows (CPU only) ---------------------


def skinny_linear(x: torch.Tensor, weight: torch.Tensor,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T (F.linear without bias), plus residual if given: [M, N] in x's dtype.

    x [M, K] float32 / bfloat16 / float16 with few rows (a decoding block: 32 tokens); weight
    [N, K] in x's dtype. The weight is read once in place (the GEMM library packs it on every
    call), float32 products summed in k order in blocks of 128 terms, rounded once
    (dmax_ext.reference.skinny_linear_reference). residual [M, N] in x's dtype: added to the
    rounded product and rounded again, bitwise `residual + x @ weight^T` in torch (a residual
    stream's add, with no op and no tensor of its own). CPU only, no autograd: the model's
    projections use it for a decoding block's rows (dmax_ext.model.modules.Linear picks it)."""
    check_tensor("x", x, dtypes=(torch.float32, torch.bfloat16, torch.float16), ndim=2)
    check_tensor("weight", weight, dtypes=(x.dtype,), ndim=2, device=x.device)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must have shape (N, {x.shape[1]}) (K of x), got "
                         f"{tuple(weight.shape)}")
    if residual is not None:
        check_tensor("residual", residual, dtypes=(x.dtype,), ndim=2, device=x.device)
        check_shape("residual", residual, (x.shape[0], weight.shape[0]))
    return torch.ops.dmax.skinny_linear(x, weight, residual)


def _skinny_linear_fake(x, weight, residual=None):
    torch._check(x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1],
                 lambda: f"x [M, K] and weight [N, K] expected, got {x.shape} and {weight.shape}")
    return x.new_empty((x.shape[0], weight.shape[0]))


FAKE_KERNELS["skinny_linear"] = _skinny_linear_fake


# ---- moe_route: a MoE layer's router after its GEMM (CPU only) ---------------------------------


def moe_route(logits: torch.Tensor, expert_bias: torch.Tensor, n_group: int, topk_group: int,
              top_k: int, scaling: float):
    """The group-limited top-k router of SPEC section 1 on the router GEMM's output.

    logits float32 [N, E]; expert_bias float32 [E]; E / n_group experts per group (at least 2).
    scores = sigmoid(logits) (torch's CPU sigmoid), biased = scores + expert_bias; a group scores
    the sum of its two best biased scores and the topk_group best groups stay; ids = the top_k
    best biased scores among their experts, descending (lowest id first on ties); weights =
    scores[ids], divided by (their sum + 1e-20) when top_k > 1, times scaling. Returns (ids int64
    [N, top_k], weights float32 [N, top_k]) (dmax_ext.model.moe.Router, the torch formulation).
    CPU only, no autograd: the model's router uses it without gradients."""
    check_tensor("logits", logits, dtypes=(torch.float32,), ndim=2)
    n_experts = logits.shape[1]
    check_tensor("expert_bias", expert_bias, dtypes=(torch.float32,), ndim=1,
                 device=logits.device)
    check_shape("expert_bias", expert_bias, (n_experts,))
    for name, value in (("n_group", n_group), ("topk_group", topk_group), ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if n_group < 1 or n_experts % n_group or n_experts // n_group < 2:
        raise ValueError(f"n_group must divide E = {n_experts} (logits' last dimension) into "
                         f"groups of at least 2 experts, got {n_group}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group must be in [1, {n_group}] (n_group), got {topk_group}")
    kept = topk_group * (n_experts // n_group)
    if not 1 <= top_k <= kept:
        raise ValueError(f"top_k must be in [1, {kept}] (the kept groups' experts), got {top_k}")
    return torch.ops.dmax.moe_route(logits, expert_bias, n_group, topk_group, top_k,
                                    float(scaling))


def _moe_route_fake(logits, expert_bias, n_group, topk_group, top_k, scaling):
    torch._check(logits.dim() == 2, lambda: f"logits must be [N, E], got {logits.shape}")
    return (logits.new_empty((logits.shape[0], top_k), dtype=torch.int64),
            logits.new_empty((logits.shape[0], top_k), dtype=torch.float32))


FAKE_KERNELS["moe_route"] = _moe_route_fake


_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---- moe_dispatch / moe_combine: the permutation around a MoE layer's grouped GEMMs ------------


def moe_dispatch(ids: torch.Tensor, n_experts: int):
    """The routed entries sorted by expert: ids int64 [N, k] (each in [0, n_experts)) ->
    (rows int64 [N k]: the token of each entry in expert order, stable; inverse int64 [N k]:
    each entry's place in that order; offsets int32 [n_experts]: each expert's end row, as
    torch._grouped_mm's offs) (dmax_ext.reference.moe_dispatch_reference). CPU and CUDA
    (csrc/kernels/moe_dispatch.cuh: at most model.moe.MOE_DISPATCH_MAX_ENTRIES entries). The
    ids' range is checked here (on CUDA a host sync)."""
    check_tensor("ids", ids, dtypes=(torch.int64,), ndim=2)
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
        raise ValueError(f"n_experts must be an int >= 1, got {n_experts!r}")
    if ids.numel() and not bool(((ids >= 0) & (ids < n_experts)).all()):
        raise ValueError(f"ids must be in [0, {n_experts}) (n_experts), got values in "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    return torch.ops.dmax.moe_dispatch(ids, n_experts)


def moe_combine(sorted_out: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor,
                addend: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
    """The experts' rows back per token: sorted_out [N k, H] (float32 / bfloat16 / float16, rows
    in moe_dispatch's order), inverse int64 [N k] (moe_dispatch's), weights float32 [N, k] ->
    [N, H] in sorted_out's dtype: sum_j weights[n, j] sorted_out[inverse[n k + j]] in float32,
    each product rounded, summed in j order, cast once; plus addend [N, H] (sorted_out's dtype)
    if given, the two rounded values added; then plus residual [N, H] (sorted_out's dtype) if
    given, rounded again (dmax_ext.reference.moe_combine_reference). CPU and CUDA. inverse's
    range is checked here (on CUDA a host sync)."""
    check_tensor("sorted_out", sorted_out, dtypes=_FLOAT_DTYPES, ndim=2)
    check_tensor("weights", weights, dtypes=(torch.float32,), ndim=2, device=sorted_out.device)
    if weights.numel() != sorted_out.shape[0]:
        raise ValueError(f"weights [N, k] must have one entry per row of sorted_out "
                         f"({sorted_out.shape[0]}), got shape {tuple(weights.shape)}")
    check_tensor("inverse", inverse, dtypes=(torch.int64,), ndim=1, device=sorted_out.device)
    check_shape("inverse", inverse, (sorted_out.shape[0],))
    if inverse.numel() and not bool(((inverse >= 0) & (inverse < inverse.numel())).all()):
        raise ValueError(f"inverse must be in [0, {inverse.numel()}) (sorted_out's rows)")
    for name, term in (("addend", addend), ("residual", residual)):
        if term is not None:
            check_tensor(name, term, dtypes=(sorted_out.dtype,), device=sorted_out.device)
            check_shape(name, term, (weights.shape[0], sorted_out.shape[1]))
    return torch.ops.dmax.moe_combine(sorted_out, inverse, weights, addend, residual)


def _moe_dispatch_fake(ids, n_experts):
    torch._check(ids.dim() == 2, lambda: f"ids must be [N, k], got {ids.shape}")
    return (ids.new_empty((ids.numel(),)), ids.new_empty((ids.numel(),)),
            ids.new_empty((n_experts,), dtype=torch.int32))


def _moe_combine_fake(sorted_out, inverse, weights, addend=None, residual=None):
    torch._check(weights.dim() == 2, lambda: f"weights must be [N, k], got {weights.shape}")
    return sorted_out.new_empty((weights.shape[0], sorted_out.shape[1]))


FAKE_KERNELS.update(moe_dispatch=_moe_dispatch_fake, moe_combine=_moe_combine_fake)


# ---- rms_norm / qk_norm_rotary: a layer's RMSNorms and the attention's q|k prologue -------------


def _check_contiguous_rows(name: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension, got strides {t.stride()}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, rounded as the model's rms_normalize rounds it:
    weight * T(x * rsqrt(mean(x^2) + eps)) with float32 math, T = x's dtype (float32, bfloat16,
    float16). x [..., H] with a contiguous last dimension (other strides free); weight [H] in x's
    dtype. Returns a new contiguous tensor shaped like x
    (dmax_ext.reference.rms_norm_reference). CPU and CUDA (csrc/kernels/norms.cuh), no
    autograd: the model's RMSNorm uses it without gradients."""
    check_tensor("x", x, dtypes=_FLOAT_DTYPES)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    _check_contiguous_rows("x", x)
    check_tensor("weight", weight, dtypes=(x.dtype,), ndim=1, device=x.device)
    check_shape("weight", weight, (x.shape[-1],))
    return torch.ops.dmax.rms_norm(x, weight, float(eps))


def add_rms_norm(x: torch.Tensor, update: torch.Tensor, weight: torch.Tensor, eps: float):
    """A residual add and the RMSNorm after it, one op: (x + update rounded to the dtype as
    torch's add, rms_norm of that sum), both new contiguous tensors shaped like x. x [..., H]
    with a contiguous last dimension; update shaped like x; weight [H]; float32 / bfloat16 /
    float16 (dmax_ext.reference.add_rms_norm_reference). CPU and CUDA, no autograd."""
    check_tensor("x", x, dtypes=_FLOAT_DTYPES)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    _check_contiguous_rows("x", x)
    check_tensor("update", update, dtypes=(x.dtype,), device=x.device)
    check_shape("update", update, x.shape)
    check_tensor("weight", weight, dtypes=(x.dtype,), ndim=1, device=x.device)
    check_shape("weight", weight, (x.shape[-1],))
    return torch.ops.dmax.add_rms_norm(x, update, weight, float(eps))


def _add_rms_norm_fake(x, update, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape)


FAKE_KERNELS["add_rms_norm"] = _add_rms_norm_fake


def qk_norm_rotary(qk: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor, n_q_heads: int,
                   eps: float) -> torch.Tensor:
    """The attention's q and k heads normalized and rotated: [B, heads, L, D] (contiguous).

    qk [B, L, heads, D] (the q|k heads of the fused qkv projection; each head's D values
    contiguous, other strides free), float32 / bfloat16 / float16; heads < n_q_heads are queries
    (q_weight [D]), the others keys (k_weight [D]); cos, sin [B, L, R] (R even, <= D) in qk's
    dtype. Each head: y = rms_norm(head, weight, eps), then the rotate-half rotary on its first
    R dims: y * cos + rotate_half(y) * sin, each product and the sum rounded to the dtype
    (dmax_ext.reference.qk_norm_rotary_reference). CPU and CUDA, no autograd."""
    check_tensor("qk", qk, dtypes=_FLOAT_DTYPES, ndim=4)
    _check_contiguous_rows("qk", qk)
    batch, length, heads, dim = qk.shape
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        check_tensor(name, w, dtypes=(qk.dtype,), ndim=1, device=qk.device)
        check_shape(name, w, (dim,))
    check_tensor("cos", cos, dtypes=(qk.dtype,), ndim=3, device=qk.device)
    if cos.shape[:2] != (batch, length) or cos.shape[2] % 2 or cos.shape[2] > dim:
        raise ValueError(f"cos must have shape ({batch}, {length}, R) with R even and <= {dim}, "
                         f"got {tuple(cos.shape)}")
    check_tensor("sin", sin, dtypes=(qk.dtype,), ndim=3, device=qk.device)
    check_shape("sin", sin, cos.shape)
    if isinstance(n_q_heads, bool) or not isinstance(n_q_heads, int) \
            or not 0 <= n_q_heads <= heads:
        raise ValueError(f"n_q_heads must be an int in [0, {heads}] (qk's heads), "
                         f"got {n_q_heads!r}")
    return torch.ops.dmax.qk_norm_rotary(qk, q_weight, k_weight, cos, sin, n_q_heads, float(eps))


def _rms_norm_fake(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _qk_norm_rotary_fake(qk, q_weight, k_weight, cos, sin, n_q_heads, eps):
    torch._check(qk.dim() == 4, lambda: f"qk must be [B, L, heads, D], got {qk.shape}")
    batch, length, heads, dim = qk.shape
    return qk.new_empty((batch, heads, length, dim))


FAKE_KERNELS.update(rms_norm=_rms_norm_fake, qk_norm_rotary=_qk_norm_rotary_fake)


def qk_norm_rotary_write_kv(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                            cos: torch.Tensor, sin: torch.Tensor, n_q_heads: int, eps: float,
                            keys: torch.Tensor, values: torch.Tensor,
                            slots: torch.Tensor) -> torch.Tensor:
    """A cached forward's attention prologue in one op: qkv [B, L, n_q + 2 n_kv, D] (the qkv
    projection's heads; each head's D values contiguous) -> the query heads normalized and
    rotated, [B, n_q, L, D]; the key heads (normalized and rotated) and the value heads (as they
    are) written in place into keys / values [B, n_kv, S, D] (same strides, D contiguous) at
    slots (int64 [L], each in [0, S): checked here, on CUDA a host sync). As qk_norm_rotary plus
    the two cache writes (dmax_ext.reference.qk_norm_rotary_write_kv_reference). CPU and CUDA,
    no autograd."""
    check_tensor("qkv", qkv, dtypes=_FLOAT_DTYPES, ndim=4)
    check_tensor("keys", keys, dtypes=(qkv.dtype,), ndim=4, device=qkv.device)
    check_tensor("values", values, dtypes=(qkv.dtype,), ndim=4, device=qkv.device)
    check_shape("values", values, keys.shape)
    n_kv = keys.shape[1]
    if isinstance(n_q_heads, bool) or not isinstance(n_q_heads, int) \
            or qkv.shape[2] != n_q_heads + 2 * n_kv:
        raise ValueError(f"qkv must hold n_q_heads + 2 n_kv heads (n_kv = {n_kv}, keys' heads), "
                         f"got {qkv.shape[2]} with n_q_heads {n_q_heads!r}")
    check_tensor("slots", slots, dtypes=(torch.int64,), ndim=1, device=qkv.device)
    check_shape("slots", slots, (qkv.shape[1],))
    if slots.numel() and not bool(((slots >= 0) & (slots < keys.shape[2])).all()):
        raise ValueError(f"slots must be in [0, {keys.shape[2]}) (keys' slots)")
    return torch.ops.dmax.qk_norm_rotary_write_kv(qkv, q_weight, k_weight, cos, sin, n_q_heads,
                                                  float(eps), keys, values, slots)


def _qk_norm_rotary_write_kv_fake(qkv, q_weight, k_weight, cos, sin, n_q_heads, eps, keys,
                                  values, slots):
    return qkv.new_empty((qkv.shape[0], n_q_heads, qkv.shape[1], qkv.shape[3]))


FAKE_KERNELS["qk_norm_rotary_write_kv"] = _qk_norm_rotary_write_kv_fake


# ---- step_tables: a cached forward's slots, rotary tables and mask ------------------------------


def step_tables(position_ids: torch.Tensor, inv_freq: torch.Tensor, valid_from: torch.Tensor,
                write_slot: torch.Tensor, span: int, block_length: int, dtype: torch.dtype):
    """(fed int64 [T], cos, sin [B, T, 2 len(inv_freq)] in dtype, mask bool [B, 1, T, span]) of
    a cached forward of T tokens at position_ids int64 [B, T], fed at the one-element int64
    write_slot (a multiple of block_length, write_slot + T <= span: checked here, on CUDA a
    host sync), sequence b's first slot valid_from[b] (dmax_ext.reference.step_tables_reference).
    CPU and CUDA."""
    check_tensor("position_ids", position_ids, dtypes=(torch.int64,), ndim=2)
    check_tensor("inv_freq", inv_freq, dtypes=(torch.float32,), ndim=1,
                 device=position_ids.device)
    check_tensor("valid_from", valid_from, dtypes=(torch.int64,), ndim=1,
                 device=position_ids.device)
    check_shape("valid_from", valid_from, (position_ids.shape[0],))
    check_tensor("write_slot", write_slot, dtypes=(torch.int64,), device=position_ids.device)
    if write_slot.numel() != 1:
        raise ValueError(f"write_slot must hold one slot, got shape {tuple(write_slot.shape)}")
    for name, value in (("span", span), ("block_length", block_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    first, length = int(write_slot.reshape(())), position_ids.shape[1]
    if first < 0 or first % block_length or first + length > span:
        raise ValueError(f"write_slot ({first}) must be a multiple of block_length "
                         f"({block_length}) with write_slot + T ({length}) <= span ({span})")
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {[str(d) for d in _FLOAT_DTYPES]}, got {dtype}")
    return torch.ops.dmax.step_tables(position_ids, inv_freq, valid_from, write_slot, span,
                                      block_length, dtype)


def _step_tables_fake(position_ids, inv_freq, valid_from, write_slot, span, block_length, dtype):
    batch, length = position_ids.shape
    rotary = 2 * inv_freq.shape[0]
    return (position_ids.new_empty((length,)),
            position_ids.new_empty((batch, length, rotary), dtype=dtype),
            position_ids.new_empty((batch, length, rotary), dtype=dtype),
            position_ids.new_empty((batch, 1, length, span), dtype=torch.bool))


FAKE_KERNELS["step_tables"] = _step_tables_fake


# ---- swiglu: a gated MLP's silu(gate) * up ------------------------------------------------------


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [..., 2I] = [gate | up] (any strides), float32 / bfloat16 /
    float16: [..., I] (contiguous), rounded as F.silu(gate) * up rounds it (silu's value, then
    the product, each rounded to the dtype; on the CPU the exp is torch's vectorized one, on
    CUDA expf) (dmax_ext.reference.swiglu_reference). CPU and CUDA (csrc/kernels/swiglu.cuh), no
    autograd: the model's gated MLPs use it without gradients."""
    check_tensor("gate_up", gate_up, dtypes=_FLOAT_DTYPES)
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up must be [..., 2I] (gate then up), got shape "
                         f"{tuple(gate_up.shape)}")
    return torch.ops.dmax.swiglu(gate_up)


def _swiglu_fake(gate_up):
    torch._check(gate_up.dim() >= 1 and gate_up.shape[-1] % 2 == 0,
                 lambda: f"gate_up must be [..., 2I], got {gate_up.shape}")
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


FAKE_KERNELS["swiglu"] = _swiglu_fake


# ---- block_attention: a decoding block's attention over the KV cache --------------------------


def block_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    mask: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale * q k^T, over the slots mask allows) v, as [B, T, heads * D] in q's dtype.

    q [B, heads, T, D]; keys, values [B, kv_heads, S, D] (heads a multiple of
    kv_heads, query head j reads kv head j // (heads / kv_heads)); each row of D contiguous,
    other strides free (a slice of the KV cache); mask bool [B or 1, 1, T, S], True = may
    attend. float32, bfloat16 or float16; the scores, softmax and sums in float32, the output
    rounded once. A query that may attend no slot gets zeros
    (dmax_ext.reference.block_attention_reference). CPU and CUDA (csrc/kernels/
    block_attention.cuh: head dims up to model.attention.BLOCK_ATTENTION_MAX_HEAD_DIM); no
    autograd: the model's Attention uses it without gradients."""
    check_tensor("q", q, dtypes=_FLOAT_DTYPES, ndim=4)
    _check_contiguous_rows("q", q)
    batch, heads, length, dim = q.shape
    for name, t in (("keys", keys), ("values", values)):
        check_tensor(name, t, dtypes=(q.dtype,), ndim=4, device=q.device)
        _check_contiguous_rows(name, t)
        if t.shape[0] != batch or t.shape[3] != dim:
            raise ValueError(f"{name} must have shape ({batch}, kv_heads, S, {dim}), "
                             f"got {tuple(t.shape)}")
    check_shape("values", values, keys.shape)
    kv_heads, slots = keys.shape[1], keys.shape[2]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"q's heads ({heads}) must be a multiple of keys' kv_heads ({kv_heads})")
    check_tensor("mask", mask, dtypes=(torch.bool,), ndim=4, device=q.device)
    if mask.shape[0] not in (1, batch) or mask.shape[1:] != (1, length, slots):
        raise ValueError(f"mask must have shape ({batch} or 1, 1, {length}, {slots}), "
                         f"got {tuple(mask.shape)}")
    return torch.ops.dmax.block_attention(q, keys, values, mask, float(scale))


def _block_attention_fake(q, keys, values, mask, scale):
    torch._check(q.dim() == 4, lambda: f"q must be [B, heads, T, D], got {q.shape}")
    batch, heads, length, dim = q.shape
    return q.new_empty((batch, length, heads * dim))


FAKE_KERNELS["block_attention"] = _block_attention_fake


# ---- decoder_layer: one decoder layer of a decoding block's cached forward (CPU only) ----------
# The model's own op, with no wrapper here: model/native_layer.py packs its arguments from a
# DecoderLayer whose modules would all take their native forms, and the C++ op and the ops it
# calls check them. Its fake kernel lets a traced forward include it.

def _decoder_layer_fake(x, cos, sin, mask, keys, values, write_slot, span, weights, dims,
                        scalars, out_rows=-1):
    rows = x.shape[1] if out_rows < 0 else out_rows
    return x.new_empty((x.shape[0], rows, x.shape[2]))


FAKE_KERNELS["decoder_layer"] = _decoder_layer_fake


def register_fake_kernels(namespace: str) -> None:
    """Registers FAKE_KERNELS for the ops that `namespace` has ("dmax" here; the tests do it for
    "dmax_simt", whose ops share the schemas)."""
    library = getattr(torch.ops, namespace)
    for name, fake in FAKE_KERNELS.items():
        if hasattr(library, name):
            torch.library.register_fake(f"{namespace}::{name}")(fake)


register_fake_kernels("dmax")
