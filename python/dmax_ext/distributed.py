"""Process-group setup for tensor-parallel runs: under torchrun, or N local processes spawned
here. NCCL when the ranks use CUDA devices, gloo on CPU. Nothing here is global state: callers
get the group back and pass it on."""
from __future__ import annotations

import gc
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def launched_world_size() -> int:
    """WORLD_SIZE as set by torchrun (or spawn_local); 1 in a plain process."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_tensor_parallel(device_type: str | None = None):
    """Joins the default process group of this launch (env://: RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT, LOCAL_RANK as torchrun sets them) -> (group, this rank's device).

    device_type "cuda" (the default when CUDA is available): device cuda:LOCAL_RANK and NCCL;
    "cpu": gloo."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("tensor parallel on cuda: CUDA is not available on this machine")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    elif device_type == "cpu":
        device = torch.device("cpu")
    else:
        raise ValueError(f"tensor parallel runs on cuda or cpu, got device {device_type!r}")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return dist.group.WORLD, device


def shutdown_process_group() -> None:
    """Leaves the default process group (and its subgroups), if one is initialized. Garbage is
    collected first, so that what still holds the group (DDP's reducer, FSDP's state, in
    reference cycles) lets go of it now: a gloo group destroyed during interpreter exit can
    abort the process after a run that succeeded ("terminate called without an active
    exception", pytorch/pytorch#190489; seen here in 2 of ~5 CI runs of the two-rank training
    test). Call it once the objects that used the group are out of scope."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_local(fn, world: int, *args) -> int:
    """Runs fn(*args) in `world` new local processes, each set up as torchrun would (RANK,
    LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT on a free port), so fn can call
    init_tensor_parallel. fn's return value is the rank's exit status; returns the first
    failing rank's (the others are then terminated), else 0. A rank's exception propagates."""
    try:
        mp.spawn(_run_rank, args=(world, free_port(), fn, args), nprocs=world, join=True)
    except mp.ProcessExitedException as e:
        return e.exit_code
    return 0


def _run_rank(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if "OMP_NUM_THREADS" not in os.environ:  # the ranks share this machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        status = fn(*args)
    finally:
        shutdown_process_group()
    if status:
        sys.exit(status)


def broadcast_int(value: int, group) -> int:
    """Rank 0's value on every rank of group (e.g. a seed drawn at random)."""
    t = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend(group) == "nccl":
        t = t.cuda()
    dist.broadcast(t, group_src=0, group=group)
    return int(t.item())
