"""Training checkpoints: the HF model layout plus `trainer_state/`, written atomically.

    out/checkpoint-00000120/
        config.json, model.safetensors (or shards + index), tokenizer files   (save_model)
        trainer_state/optimizer.pt, scheduler.pt, rng.pt
        trainer_state/state.json     step, data position, config, and a manifest: the size and
                                     sha256 of every file of the checkpoint (written last)

A checkpoint is built in a hidden temporary folder and renamed into place when complete, so a
killed run leaves either a whole checkpoint or none. On resume the manifest is checked file by
file; a checkpoint without one (partial) or whose files differ from it (corrupt) is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

STATE_DIR = "trainer_state"
STATE_FILE = "state.json"
FORMAT_VERSION = 1
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (partial, corrupt, or for another run); a
    ValueError so the CLI reports it as a user error."""


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest(root: Path) -> dict[str, dict]:
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != f"{STATE_DIR}/{STATE_FILE}":
            files[rel] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    return files


def write_checkpoint(out_dir: Path, step: int, save_model_fn, tensors: dict[str, object],
                     state: dict) -> Path:
    """Writes out_dir/checkpoint-<step>: `save_model_fn(path)` writes the HF layout, `tensors`
    (name -> picklable-by-torch object) go to trainer_state/<name>.pt, `state` to state.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / checkpoint_name(step)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=out_dir))
    try:
        staged = scratch / "checkpoint"
        save_model_fn(staged)
        (staged / STATE_DIR).mkdir()
        for name, obj in tensors.items():
            torch.save(obj, staged / STATE_DIR / f"{name}.pt")
        record = dict(state, format_version=FORMAT_VERSION, step=step, files=_manifest(staged))
        state_path = staged / STATE_DIR / STATE_FILE
        state_path.write_text(json.dumps(record, indent=2) + "\n")
        _fsync_tree(staged)
        if final.exists():  # a rerun of the same step: replace it whole
            shutil.rmtree(final)
        os.rename(staged, final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def read_checkpoint_state(path: str | Path) -> dict:
    """state.json of a checkpoint after checking every file against its manifest."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"cannot resume from {path}: no such checkpoint folder")
    state_path = path / STATE_DIR / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(
            f"cannot resume from {path}: partial checkpoint ({STATE_DIR}/{STATE_FILE} is missing; "
            "it is written last, so the save did not finish)")
    try:
        state = json.loads(state_path.read_text())
        files = state["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot resume from {path}: corrupt {STATE_DIR}/{STATE_FILE} ({e})") from None
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"cannot resume from {path}: format_version "
                              f"{state.get('format_version')!r}, expected {FORMAT_VERSION}")
    for rel, want in files.items():
        file = path / rel
        if not file.is_file():
            raise CheckpointError(f"cannot resume from {path}: partial checkpoint ({rel} is missing)")
        size = file.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"cannot resume from {path}: corrupt checkpoint ({rel} has "
                                  f"{size} bytes, the manifest says {want['bytes']})")
        if _sha256(file) != want["sha256"]:
            raise CheckpointError(f"cannot resume from {path}: corrupt checkpoint ({rel} does "
                                  "not match its sha256 in the manifest)")
    return state


def load_state_tensors(path: str | Path, name: str):
    return torch.load(Path(path) / STATE_DIR / f"{name}.pt", map_location="cpu", weights_only=True)


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first (temporary folders are not listed)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir()
             if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def prune_checkpoints(out_dir: str | Path, keep: int) -> None:
    """Deletes all but the newest `keep` checkpoints (keep <= 0: keep all) and stale temporaries."""
    out_dir = Path(out_dir)
    found = list_checkpoints(out_dir)
    if keep > 0:
        for old in found[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in out_dir.glob(".checkpoint-*.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
