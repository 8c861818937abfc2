"""Training speed: the OPUT step (training/trainer.py, Trainer._train_step) on random_model(preset),
synthetic prompt + response data: tokens per second and the share of step time spent in the
on-policy rollout (oput.rollout, timed by wrapping it).

    python benchmarks/oput_speed.py                       # llada2-small, seq 512, 1 thread, fp32
    python benchmarks/oput_speed.py --precision bf16      # bf16 autocast (CPU)

A step trains `--global-batch` sequences in micro batches of `--micro-batch`; each micro batch
forwards [noisy ; clean] = 2 x seq_len tokens (twice for a flagged sample: rollout, then the
training forward + backward). Every example appears flagged and unflagged once per epoch, so over
an epoch half the samples roll out; the first steps' mix depends on the epoch permutation and is
printed. Sequence tokens/s counts seq_len per sample; model tokens/s counts the 2 x seq_len
tokens each training forward sees.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))

import dmax_ext  # noqa: E402
from dmax_ext.training import oput  # noqa: E402
from dmax_ext.training import trainer as trainer_module  # noqa: E402
from dmax_ext.training.data import TokenizedData  # noqa: E402
from dmax_ext.training.oput import DiffusionConfig  # noqa: E402
from dmax_ext.training.trainer import TrainConfig, Trainer  # noqa: E402


def synthetic_data(config, n: int, seq_len: int, seed: int = 0) -> TokenizedData:
    """n sequences: a prompt of 10-25% of seq_len, a response up to 75%, eos padding."""
    g = torch.Generator().manual_seed(seed)
    eos, special = config.eos_token_id, {config.eos_token_id, config.mask_token_id}
    ids = torch.full((n, seq_len), eos, dtype=torch.int64)
    prompt_len = torch.randint(seq_len // 10, seq_len // 4, (n,), generator=g)
    end = torch.minimum(prompt_len + torch.randint(seq_len // 4, seq_len // 2, (n,), generator=g),
                        torch.tensor(seq_len))
    for i in range(n):
        body = torch.randint(config.vocab_size, (int(end[i]) - 1,), generator=g)
        body[torch.isin(body, torch.tensor(sorted(special)))] = 0
        ids[i, :int(end[i]) - 1] = body
    return TokenizedData(ids, prompt_len, end, 0, f"oput-speed-{n}-{seq_len}-{seed}")


class SectionTimer:
    """Times, by wrapping them, oput.rollout (called by loss_sum), trainer.loss_sum (rollout +
    training forward + cross-entropy) and the optimizer step; the rest of a step is the
    backward, gradient clipping and bookkeeping."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.seconds = {"rollout": 0.0, "loss_sum": 0.0, "optimizer": 0.0}
        self.rollouts = 0

    def _wrap(self, owner, name, section, count=None):
        real = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self.seconds[section] += time.perf_counter() - start
                if count is not None:
                    self.rollouts += count(*args)
        setattr(owner, name, timed)
        self._restore.append((owner, name, real))

    def __enter__(self):
        self._restore = []
        # a rollout forward runs when the micro batch has a flagged sample
        self._wrap(oput, "rollout", "rollout", lambda model, batch, *a: int(batch.flags.any()))
        self._wrap(trainer_module, "loss_sum", "loss_sum")
        self._wrap(self.optimizer, "step", "optimizer")
        return self

    def __exit__(self, *exc):
        for owner, name, real in reversed(self._restore):
            setattr(owner, name, real)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llada2-small")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--global-batch", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = dmax_ext.random_model(args.preset, dtype=torch.float32)
    c = model.config
    data = synthetic_data(c, 4 * args.global_batch, args.seq_len)
    cfg = TrainConfig(diffusion=DiffusionConfig(mode="oput", mask_id=c.mask_token_id,
                                                eos_id=c.eos_token_id),
                      global_batch=args.global_batch, micro_batch=args.micro_batch,
                      max_steps=args.steps + 1, precision=args.precision, progress=False)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, data, cfg, out)
        trainer._train_step()  # warm-up (allocations, library set-up)
        trainer.step += 1
        steps, timers = [], []
        for _ in range(args.steps):
            with SectionTimer(trainer.optimizer) as timer:
                start = time.perf_counter()
                trainer._train_step()
                steps.append(time.perf_counter() - start)
            timers.append(timer)
            trainer.step += 1
    samples = args.global_batch
    step_s = statistics.median(steps)
    total = sum(steps)
    share = {k: sum(t.seconds[k] for t in timers) / total for k in timers[0].seconds}
    flagged = [t.rollouts for t in timers]
    print(f"oput_speed: {args.preset}, seq_len {args.seq_len} ({2 * args.seq_len} tokens with the "
          f"clean half), global batch {samples}, micro batch {args.micro_batch}, precision "
          f"{args.precision}, threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"step: median {step_s:.2f} s over {args.steps} steps "
          f"({', '.join(f'{s:.2f}' for s in steps)} s)")
    print(f"sequence tokens/s: {samples * args.seq_len / step_s:.1f}; model tokens/s (training "
          f"forward, 2 x seq_len): {samples * 2 * args.seq_len / step_s:.1f}")
    print(f"rollout: {100 * share['rollout']:.1f}% of step time (rollout forwards per step "
          f"{flagged}: a micro batch with a flagged sample rolls it out)")
    forward = share["loss_sum"] - share["rollout"]
    rest = 1 - share["loss_sum"] - share["optimizer"]
    print(f"split: rollout {100 * share['rollout']:.1f}%, training forward + loss "
          f"{100 * forward:.1f}%, backward + clipping + rest {100 * rest:.1f}%, optimizer "
          f"{100 * share['optimizer']:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
