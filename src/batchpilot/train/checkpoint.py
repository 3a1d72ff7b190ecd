"""Atomic checkpoints: everything needed to continue a run exactly.

Layout under ``OUT/checkpoints/``::

    step-00000040/train.pt        model + optimizer (full state dicts), GradScaler, trainer state
                                  (counters, data position, batch-schedule and hook states)
    step-00000040/rng-rank0.pt    each rank's torch (and CUDA) and Python RNG states
    latest                        the name of the newest complete checkpoint

Atomicity: files are written into ``.tmp-step-…`` and the directory is renamed (``os.replace``) only
once every rank has written; ``latest`` is replaced the same way. A crash (even ``kill -9``) leaves
either the previous checkpoint or the new one, never a half-written one. Multi-node runs need
``OUT`` on a shared filesystem.

Model and optimizer go through ``torch.distributed.checkpoint.state_dict`` (``full_state_dict``), so
the same file restores a single process, DDP or FSDP2 run. Files are read with ``weights_only=True``.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from batchpilot.errors import BatchpilotError
from batchpilot.train.distributed import DistEnv

CHECKPOINTS = "checkpoints"


def _barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, state: dict[str, Any], env: DistEnv, keep: int) -> Path:
    """Write checkpoint ``step`` atomically (a collective: every rank must call it)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    root = out / CHECKPOINTS
    name = f"step-{step:08d}"
    tmp, final = root / f".tmp-{name}", root / name
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save({"model": model_sd, "optimizer": optim_sd, "scaler": scaler.state_dict(), "state": state},
                   tmp / "train.pt")
    _barrier(env)
    torch.save(_rng_state(), tmp / f"rng-rank{env.rank}.pt")
    _barrier(env)
    if env.is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        (root / "latest.tmp").write_text(name, encoding="utf-8")
        os.replace(root / "latest.tmp", root / "latest")
        _prune(root, keep)
    _barrier(env)
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint under ``out``, or None."""
    pointer = out / CHECKPOINTS / "latest"
    if not pointer.is_file():
        return None
    path = out / CHECKPOINTS / pointer.read_text(encoding="utf-8").strip()
    return path if (path / "train.pt").is_file() else None


def load_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, env: DistEnv) -> dict[str, Any]:
    """Restore model, optimizer, scaler and this rank's RNG; returns the trainer state."""
    try:
        blob = torch.load(path / "train.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise BatchpilotError(f"checkpoint {str(path)!r} cannot be read: {' '.join(str(exc).split())[:160]}") from None
    set_state_dict(model, optimizer, model_state_dict=blob["model"], optim_state_dict=blob["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
    scaler.load_state_dict(blob["scaler"]) if blob["scaler"] else None
    rng = path / f"rng-rank{env.rank}.pt"
    _set_rng_state(torch.load(rng if rng.exists() else path / "rng-rank0.pt", weights_only=True))
    return dict(blob["state"])
