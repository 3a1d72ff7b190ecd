"""Atomic checkpoints: everything needed to continue a run exactly.

Layout under ``OUT/checkpoints/``::

    step-00000040/train.pt        model + optimizer (full state dicts), GradScaler, trainer state
                                  (counters, data position, batch-schedule and hook states)
    step-00000040/rng-rank0.pt    each rank's torch (and CUDA) and Python RNG states
    step-00000040/manifest.json   SHA-256 and size of every other file, written last, before the rename
    latest                        the name of the newest complete checkpoint

Atomicity: files are written into ``.tmp-step-…`` and the directory is renamed (``os.replace``) only
once every rank has written; ``latest`` is replaced the same way. A crash (even ``kill -9``) leaves
either the previous checkpoint or the new one, never a half-written one. Multi-node runs need
``OUT`` on a shared filesystem.

Integrity: on resume the manifest is checked (a flipped bit or a cut file changes the SHA-256); a
checkpoint that fails it, or cannot be unpickled, is skipped with a warning (logger ``batchpilot.train``)
and the next older ``step-*`` is tried; none good is a one-line error. Checkpoints written before
manifests existed are loaded unchecked. The same selection serves ``--model RUN_DIR``
(:func:`load_model_weights`: the model weights only, for a new run or ``batchpilot noise``).

Model and optimizer go through ``torch.distributed.checkpoint.state_dict`` (``full_state_dict``), so
the same file restores a single process, DDP or FSDP2 run. Files are read with ``weights_only=True``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from batchpilot.errors import BatchpilotError
from batchpilot.train.distributed import DistEnv, elastic_restart_count

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
_log = logging.getLogger("batchpilot.train")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_manifest(directory: Path) -> None:
    files = {p.name: {"sha256": _sha256(p), "size_bytes": p.stat().st_size}
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=1), encoding="utf-8")
    os.replace(tmp, directory / MANIFEST)


def verify_checkpoint(path: Path) -> str | None:
    """None when every file matches the manifest (or there is no manifest: an older checkpoint), else why not."""
    manifest = path / MANIFEST
    if not manifest.exists():
        return None if (path / "train.pt").is_file() else "train.pt is missing"
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        for name, entry in files.items():
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != entry["size_bytes"]:
                return f"{name} has {file.stat().st_size} bytes, the manifest says {entry['size_bytes']}"
            if _sha256(file) != entry["sha256"]:
                return f"{name} does not match its SHA-256 in the manifest (corrupted)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"the manifest cannot be read: {' '.join(str(exc).split())[:120]}"
    return None


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
                    scaler: torch.amp.GradScaler, state: dict[str, Any], env: DistEnv, keep: int,
                    unchanged: bool = False) -> Path:
    """Write checkpoint ``step`` atomically (a collective: every rank must call it). ``unchanged``: this
    run already saved or resumed from exactly this state; an existing complete ``step`` is then kept."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    root = out / CHECKPOINTS
    name = f"step-{step:08d}"
    tmp, final = root / f".tmp-{name}", root / name
    if unchanged and (final / MANIFEST).is_file():
        # This run already saved (or resumed from) this very state, and it is complete on disk (the manifest
        # is written last): resume then a signal, or the periodic and the final save of one step. Rewriting
        # it would open a window (rmtree, then rename) where a crash leaves ``latest`` naming no directory.
        if env.is_main:
            _point_latest(root, name)
        _barrier(env)
        return final
    try:
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            torch.save({"model": model_sd, "optimizer": optim_sd, "scaler": scaler.state_dict(), "state": state},
                       tmp / "train.pt")
        _agree(env, None, tmp, out)
        torch.save(_rng_state(), tmp / f"rng-rank{env.rank}.pt")
        _agree(env, None, tmp, out)
        if env.is_main:
            _write_manifest(tmp)
    except (OSError, RuntimeError) as exc:
        _agree(env, exc, tmp, out)
    _agree(env, None, tmp, out)
    if env.is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _point_latest(root, name)
        _prune(root, keep)
    _barrier(env)
    return final


def _point_latest(root: Path, name: str) -> None:
    (root / "latest.tmp").write_text(name, encoding="utf-8")
    os.replace(root / "latest.tmp", root / "latest")


def _out_of_space(error: BaseException | None) -> bool:
    """ENOSPC/EFBIG/EDQUOT, or torch's zip writer's wording for a short write (``unexpected pos``)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return True
    text = str(error).lower()
    return any(s in text for s in ("unexpected pos", "file too large", "no space", "error writing"))


def _agree(env: DistEnv, error: BaseException | None, tmp: Path, out: Path) -> None:
    """A barrier that also agrees on failure: when any rank could not write, every rank removes the
    partial ``tmp`` (the previous checkpoint and ``latest`` are untouched) and raises one line."""
    failed = 1.0 if error is not None else 0.0
    if env.distributed:
        flag = torch.tensor([failed], dtype=torch.float64, device=env.device)
        dist.all_reduce(flag)
        failed = float(flag.item())
    if not failed:
        return
    shutil.rmtree(tmp, ignore_errors=True)
    text = " ".join(str(error).split())[:160] if error is not None else "another rank could not write its file"
    why = "no space left on the device or file too large" if _out_of_space(error) else "write failed"
    kept = latest_checkpoint(out)
    raise BatchpilotError(
        f"cannot write checkpoint {str(tmp)!r} ({why}: {text}); the partial files were removed and "
        + (f"the previous checkpoint {str(kept)!r} is kept" if kept else "no earlier checkpoint exists")
        + "; free space (or raise the file-size limit) and run again with --resume")


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint ``latest`` names when it exists (not verified; see :func:`load_latest`), or None."""
    pointer = out / CHECKPOINTS / "latest"
    if not pointer.is_file():
        return None
    path = out / CHECKPOINTS / pointer.read_text(encoding="utf-8").strip()
    return path if (path / "train.pt").is_file() else None


def _candidates(out: Path) -> list[Path]:
    """``latest`` first, then every other ``step-*`` newest first."""
    named = latest_checkpoint(out)
    older = sorted((p for p in (out / CHECKPOINTS).glob("step-*") if p.is_dir()), reverse=True)
    return ([named] if named else []) + [p for p in older if p != named]


def _read(path: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    problem = verify_checkpoint(path)
    if problem:
        raise BatchpilotError(f"checkpoint {str(path)!r} is damaged: {problem}")
    try:
        blob = torch.load(path / "train.pt", map_location="cpu", weights_only=True)
        rng = path / f"rng-rank{rank}.pt"
        rng_state = torch.load(rng if rng.exists() else path / "rng-rank0.pt", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise BatchpilotError(f"checkpoint {str(path)!r} cannot be read: {' '.join(str(exc).split())[:160]}") from None
    if not isinstance(blob, dict) or not {"model", "optimizer", "scaler", "state"} <= blob.keys():
        raise BatchpilotError(f"checkpoint {str(path)!r} cannot be read: train.pt is not a batchpilot checkpoint")
    return blob, rng_state


def has_checkpoints(out: Path) -> bool:
    """Whether ``out`` holds any checkpoint (complete or not) that a resume would consider."""
    return bool(_candidates(out))


def check_fresh_start(out: Path, *, resume: bool) -> None:
    """Refuse to start a run from step 0 (no ``resume``, not an elastic restart) in a directory that holds
    another run's checkpoints: its own would be pruned against them by step number (a new
    ``step-00000002`` goes before an old ``step-00000100``) and a later resume, or an elastic restart,
    would continue the other run."""
    if resume or elastic_restart_count():
        return
    found = _candidates(out)
    if found:
        raise BatchpilotError(f"--out {str(out)!r} already holds checkpoints of a run (newest {found[0].name!r}); "
                              f"continue it with --resume, or choose another --out (or remove "
                              f"{str(out / CHECKPOINTS)!r} to start again)")


def _newest_good(out: Path, rank: int, *, warn: bool, who: str, fix: str,
                 action: str) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """The newest checkpoint of ``out`` that passes its checksums and loads, with its blob and RNG state;
    older ones are tried in turn (one warning line, when ``warn``, names what was skipped and why). The one
    implementation of checkpoint selection: ``--resume`` and ``--model RUN_DIR`` both go through it."""
    candidates = _candidates(out)
    if not candidates:
        raise BatchpilotError(f"{who}: no complete checkpoint in {str(out / CHECKPOINTS)!r}; {fix}")
    problems = []
    for path in candidates:
        try:
            blob, rng_state = _read(path, rank)
        except BatchpilotError as exc:
            problems.append(str(exc))
            continue
        if problems and warn:
            _log.warning("warning: %s; %s the older checkpoint %r instead", "; ".join(problems), action, str(path))
        return path, blob, rng_state
    raise BatchpilotError(f"{who}: none of the {len(candidates)} checkpoints in {str(out / CHECKPOINTS)!r} "
                          f"is usable (newest: {problems[0]}); {fix}")


def load_latest(out: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                env: DistEnv) -> tuple[Path, dict[str, Any]]:
    """Restore the newest checkpoint that passes its checksums and loads; older ones are tried in turn
    (one warning line names what was skipped and why). Returns (the checkpoint used, the trainer state)."""
    path, blob, rng_state = _newest_good(out, env.rank, warn=env.is_main, who="--resume",
                                         fix="run without --resume to start fresh", action="resuming from")
    _apply(blob, rng_state, model=model, optimizer=optimizer, scaler=scaler)
    return path, dict(blob["state"])


def load_model_weights(out: Path, module: nn.Module, *, warn: bool = True) -> Path:
    """Only the model weights of run folder ``out``'s newest good checkpoint, into an unwrapped ``module``
    built from the run's model config: the start of a new run or a noise measurement (``--model RUN_DIR``),
    not a resume — the optimizer, scaler, RNG and trainer state (step, data position, schedule) stay behind.
    Returns the checkpoint used."""
    who = f"--model {str(out)!r}"
    path, blob, _ = _newest_good(out, 0, warn=warn, who=who, action="loading weights from",
                                 fix="train that run with a checkpoint (any run that ends or is stopped by a "
                                     "signal writes one), or pass another run folder")
    try:
        module.load_state_dict(blob["model"], strict=True)
    except (RuntimeError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise BatchpilotError(f"{who}: the weights in {str(path)!r} do not fit the model built from the run's "
                              f"recorded model config ({detail}); was that config file changed since?") from None
    return path


def _apply(blob: dict[str, Any], rng_state: dict[str, Any], *, model: nn.Module, optimizer: torch.optim.Optimizer,
           scaler: torch.amp.GradScaler) -> None:
    set_state_dict(model, optimizer, model_state_dict=blob["model"], optim_state_dict=blob["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
    scaler.load_state_dict(blob["scaler"]) if blob["scaler"] else None
    _set_rng_state(rng_state)


def load_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, env: DistEnv) -> dict[str, Any]:
    """Restore model, optimizer, scaler and this rank's RNG from ``path`` (checked against its manifest);
    returns the trainer state."""
    blob, rng_state = _read(path, env.rank)
    _apply(blob, rng_state, model=model, optimizer=optimizer, scaler=scaler)
    return dict(blob["state"])
