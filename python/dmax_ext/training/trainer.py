"""The trainer: AdamW + warm-up/cosine, grad clipping, DDP or FSDP2, checkpoints, exact resume.

Data order and noise are functions of (seed, step), not of a running random stream: epoch e visits
the items in the order of a permutation seeded by (seed, e); the noise of a sample comes from a
generator seeded by (seed, step, its slot in the global batch). So a run resumed at step k replays
exactly what the uninterrupted run would have done, given the restored weights, optimizer and
scheduler, and the split of a global batch over ranks and micro batches changes nothing.
Bitwise equality also needs deterministic kernels (`deterministic=True`): with several threads,
some CPU backward kernels (index_put with accumulation in the MoE dispatch) sum in varying order.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint as ckpt
from .data import TokenizedData
from .oput import (DiffusionConfig, concat_batches, loss_sum, make_batch,
                   two_half_attention_mask)
from .parallel import (ExpertLoadBalancer, apply_activation_checkpointing, full_state_dict,
                       load_full_optimizer_state, optimizer_state_for_save, shard_with_fsdp,
                       zero_row_grad)


@dataclass
class TrainConfig:
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    lr: float = 2e-6
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    epochs: float = 2.0
    max_steps: int | None = None     # overrides epochs
    global_batch: int = 8
    micro_batch: int = 1
    grad_clip: float = 1.0
    seed: int = 0
    save_every: int = 0              # steps; 0: only at the end
    keep_checkpoints: int = 2
    precision: str = "auto"          # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    activation_checkpointing: bool = False
    fsdp: bool = False
    expert_bias_rate: float = 0.0    # aux-loss-free expert balancing (0: expert_bias untouched)
    deterministic: bool = False      # torch.use_deterministic_algorithms: bitwise-repeatable runs
    progress: bool = True


def derived_seed(*parts) -> int:
    digest = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """Trains `model` (fp32 master weights) on `data`; writes checkpoints and the loss log to
    `out_dir`. `resume`: None, "auto" (the newest checkpoint in out_dir, if any) or a path."""

    def __init__(self, model, data: TokenizedData, cfg: TrainConfig, out_dir, tokenizer=None,
                 resume: str | Path | None = None, process_group=None):
        self.cfg, self.data, self.out_dir = cfg, data, Path(out_dir)
        self.group = process_group if process_group is not None else (
            dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        self.rank = dist.get_rank(self.group) if self.group is not None else 0
        self.world = dist.get_world_size(self.group) if self.group is not None else 1
        per_step = cfg.micro_batch * self.world
        if cfg.global_batch % per_step:
            raise ValueError(f"global_batch ({cfg.global_batch}) must be a multiple of micro_batch "
                             f"x world size ({cfg.micro_batch} x {self.world})")
        self.accum = cfg.global_batch // per_step
        self.items_per_epoch = len(data) * (2 if cfg.diffusion.mode == "oput" else 1)
        self.steps_per_epoch = self.items_per_epoch // cfg.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.items_per_epoch} items per epoch cannot fill one global "
                             f"batch of {cfg.global_batch}")
        self.total_steps = cfg.max_steps or max(1, int(cfg.epochs * self.steps_per_epoch))
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        self.config = model.config
        self.device = model.device
        self.step = 0

        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        model.float()  # fp32 master weights; autocast handles bf16 compute
        resume_path = self._resume_path(resume)
        state = None
        if resume_path is not None:
            state = ckpt.read_checkpoint_state(resume_path)
            self._check_compatible(state, resume_path)
            self._load_weights(model, resume_path)
        self.model = model
        self.balancer = ExpertLoadBalancer(model, cfg.expert_bias_rate, self.group)
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(model)
        self.wrapped = self._wrap(model)
        self.optimizer = self._make_optimizer()
        warmup = max(1, int(cfg.warmup_ratio * self.total_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, warmup, cfg.min_lr_ratio))
        self.attention_mask = two_half_attention_mask(data.seq_len, cfg.diffusion.block_length,
                                                      self.device)
        if state is not None:
            self._load_state(resume_path, state)
        self.log_path = self.out_dir / "train_log.jsonl"
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._truncate_log()

    # -- setup ---------------------------------------------------------------------------------
    def _resume_path(self, resume) -> Path | None:
        if resume is None:
            existing = ckpt.latest_checkpoint(self.out_dir)
            if existing is not None:  # they would mix with this run's checkpoints
                raise ValueError(f"{self.out_dir} already holds checkpoints ({existing.name}); "
                                 "resume from them or train into another folder")
            return None
        if str(resume) == "auto":
            return ckpt.latest_checkpoint(self.out_dir)
        return Path(resume)

    def _check_compatible(self, state: dict, path: Path) -> None:
        mine = {"data_fingerprint": self.data.fingerprint, "global_batch": self.cfg.global_batch,
                "seed": self.cfg.seed, "mode": self.cfg.diffusion.mode}
        for key, value in mine.items():
            if state.get(key) != value:
                raise ckpt.CheckpointError(f"cannot resume from {path}: it was written with "
                                           f"{key}={state.get(key)!r}, this run has {value!r}")

    def _load_weights(self, model, path: Path) -> None:
        from ..model import load_model
        loaded = load_model(path, device="cpu", dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())

    def _wrap(self, model):
        if self.cfg.fsdp:
            if self.group is None:
                raise ValueError("fsdp needs torch.distributed to be initialized (run under torchrun)")
            return shard_with_fsdp(model, self._autocast_dtype())
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # Buffers (expert_bias) change identically on every rank: no per-forward sync.
            sync = ({"forward_sync_buffers": False}
                    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                    else {"broadcast_buffers": False})
            return DistributedDataParallel(model, device_ids=ids, process_group=self.group, **sync)
        return model

    def _make_optimizer(self):
        decay, no_decay = [], []
        for p in self.wrapped.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)  # norms: no weight decay
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        # fused: one kernel for all parameters. On the CPU the default (a loop of ~10 ops per
        # parameter) took 449 ms a step for llada2-small's 100M parameters, fused 49 ms
        # (docs/PERFORMANCE.md, 2026-12-06 16:55).
        return torch.optim.AdamW(groups, lr=self.cfg.lr, betas=self.cfg.betas, fused=True)

    def _autocast_dtype(self):
        p = self.cfg.precision
        if p not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {p!r}")
        if p == "bf16" or (p == "auto" and self.device.type == "cuda"):
            return torch.bfloat16
        return None

    # -- data ----------------------------------------------------------------------------------
    def _items(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (item ids, their slots in the global batch) for `step`; item i >= N is
        example i - N (the flag-false copy)."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        seed = derived_seed(self.cfg.seed, "epoch", epoch)
        order = torch.randperm(self.items_per_epoch, generator=torch.Generator().manual_seed(seed))
        batch = order[offset * self.cfg.global_batch:(offset + 1) * self.cfg.global_batch]
        per_rank = self.cfg.global_batch // self.world
        slots = torch.arange(self.rank * per_rank, (self.rank + 1) * per_rank)
        return batch[slots], slots

    def _micro_batches(self, step: int):
        """Each sample's noise comes from its own generator seeded by (seed, step, slot), so the
        split into ranks and micro batches does not change what is trained on."""
        n = len(self.data)
        items, slots = self._items(step)
        for chunk, chunk_slots in zip(items.split(self.cfg.micro_batch), slots.split(self.cfg.micro_batch)):
            samples = []
            for item, slot in zip(chunk.tolist(), chunk_slots.tolist()):
                i = item % n
                gen = torch.Generator().manual_seed(derived_seed(self.cfg.seed, "noise", step, slot))
                samples.append(make_batch(
                    self.data.ids[i:i + 1], self.data.prompt_len[i:i + 1],
                    self.data.response_end[i:i + 1], torch.tensor([item < n]), self.cfg.diffusion, gen))
            yield concat_batches(samples).to(self.device)

    # -- training ------------------------------------------------------------------------------
    def train(self, stop_after: int | None = None) -> dict:
        """Runs to the last step (or until `stop_after` steps have been done in total);
        returns {"step", "loss"} of the last step."""
        end = self.total_steps if stop_after is None else min(stop_after, self.total_steps)
        bar = None
        if self.cfg.progress and self.rank == 0:
            from tqdm import tqdm
            bar = tqdm(total=self.total_steps, initial=self.step, desc=f"train {self.cfg.diffusion.mode}",
                       dynamic_ncols=True)
        last = {"step": self.step, "loss": float("nan")}
        start_time = time.time()
        while self.step < end:
            record = self._train_step()
            self.step += 1
            record.update(step=self.step, elapsed_s=round(time.time() - start_time, 3))
            last = record
            if self.rank == 0:
                with open(self.log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            if self.step == self.total_steps or (self.cfg.save_every and self.step % self.cfg.save_every == 0):
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        return last

    def _train_step(self) -> dict:
        batches = list(self._micro_batches(self.step))
        n_labels = torch.tensor(float(sum(b.n_labels for b in batches)), device=self.device)
        if self.group is not None:
            dist.all_reduce(n_labels, group=self.group)
        # Gradients are averaged over ranks by DDP/FSDP; scaling by world restores the global sum.
        scale = self.world / max(float(n_labels), 1.0)
        inner = self.wrapped.module if isinstance(self.wrapped, DistributedDataParallel) else self.wrapped
        total = torch.zeros((), device=self.device)
        autocast_dtype = self._autocast_dtype()
        self.wrapped.train()
        for m, batch in enumerate(batches):
            last_micro = m == len(batches) - 1
            with self._sync_context(last_micro), torch.autocast(
                    self.device.type, dtype=autocast_dtype or torch.float32,
                    enabled=autocast_dtype is not None):
                loss = loss_sum(self.wrapped, batch, self.cfg.diffusion, self.attention_mask,
                                rollout_model=inner, always_forward=self.cfg.fsdp)
            (loss * scale).backward()
            total += loss.detach()
        zero_row_grad(self.model.embedding_weight, self.config.pad_token_id, self.world, self.rank)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), self.cfg.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.balancer.update()
        if self.group is not None:
            dist.all_reduce(total, group=self.group)
        return {"loss": float(total) / max(float(n_labels), 1.0), "n_labels": int(n_labels),
                "grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
                "lr": lr}

    def _sync_context(self, last_micro: bool):
        if isinstance(self.wrapped, DistributedDataParallel) and not last_micro:
            return self.wrapped.no_sync()
        if self.cfg.fsdp:
            self.wrapped.set_requires_gradient_sync(last_micro)
        return contextlib.nullcontext()

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Writes out_dir/checkpoint-<step> (rank 0 writes; every rank takes part in gathering)."""
        model_for_save = full_state_dict(self.wrapped, self.model, self.cfg.fsdp)
        optim_state = optimizer_state_for_save(self.wrapped, self.optimizer, self.cfg.fsdp)
        path = None
        if self.rank == 0:
            from ..model import save_model
            rng = {"torch": torch.get_rng_state(),
                   "python": json.dumps(random.getstate())}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            state = {"data_fingerprint": self.data.fingerprint, "global_batch": self.cfg.global_batch,
                     "seed": self.cfg.seed, "mode": self.cfg.diffusion.mode,
                     "total_steps": self.total_steps, "world_size": self.world,
                     "epoch": self.step // self.steps_per_epoch,
                     "step_in_epoch": self.step % self.steps_per_epoch,
                     "config": json.loads(json.dumps(asdict(self.cfg), default=str))}
            path = ckpt.write_checkpoint(
                self.out_dir, self.step,
                lambda p: save_model(model_for_save, p, tokenizer=self.tokenizer),
                {"optimizer": optim_state, "scheduler": self.scheduler.state_dict(), "rng": rng},
                state)
            ckpt.prune_checkpoints(self.out_dir, self.cfg.keep_checkpoints)
        if self.group is not None:
            dist.barrier(group=self.group)
        return path

    def save_final(self) -> Path:
        """out_dir/final: the trained model alone (HF layout, atomic), ready for decoding."""
        model_for_save = full_state_dict(self.wrapped, self.model, self.cfg.fsdp)
        path = self.out_dir / "final"
        if self.rank == 0:
            from ..model import save_model
            save_model(model_for_save, path, tokenizer=self.tokenizer)
        if self.group is not None:
            dist.barrier(group=self.group)
        return path

    def _load_state(self, path: Path, state: dict) -> None:
        self.step = int(state["step"])
        load_full_optimizer_state(self.wrapped, self.optimizer,
                                  ckpt.load_state_tensors(path, "optimizer"), self.cfg.fsdp)
        self.scheduler.load_state_dict(ckpt.load_state_tensors(path, "scheduler"))
        rng = ckpt.load_state_tensors(path, "rng")
        torch.set_rng_state(rng["torch"])
        random.setstate(_as_tuple(json.loads(rng["python"])))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def _truncate_log(self) -> None:
        """Drops log lines past the resumed step (a killed run logged steps it did not save)."""
        if not self.log_path.exists():
            return
        kept = [line for line in self.log_path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= self.step]
        self.log_path.write_text("".join(line + "\n" for line in kept))


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list) else x
