"""Atomic checkpoints: everything needed to continue a run exactly.

Layout under ``OUT/checkpoints/``::

    step-00000040/dcp/            model + optimizer in torch.distributed.checkpoint (DCP) format: each rank
                                  writes its own shards (FSDP2, tensor parallelism; DDP's replicated tensors
                                  are written once), ``.metadata`` says where every piece lives
    step-00000040/train.pt        GradScaler, trainer state (counters, data position, batch-schedule and hook
                                  states)
    step-00000040/rng-rank0.pt    each rank's torch (and CUDA) and Python RNG states
    step-00000040/manifest.json   SHA-256 and size of every other file (``dcp/`` included), written last
    latest                        the name of the newest complete checkpoint

Atomicity: files are written into ``.tmp-step-…`` and the directory is renamed (``os.replace``) only
once every rank has written; ``latest`` is replaced the same way. A crash (even ``kill -9``) leaves
either the previous checkpoint or the new one, never a half-written one. Multi-node runs need
``OUT`` on a shared filesystem (every rank writes into the same ``.tmp-step-…``; rank 0 renames it).

Sharded and resharded: model and optimizer go through ``torch.distributed.checkpoint.state_dict``
(``get_state_dict``: DTensor shards under FSDP2/TP, whole tensors otherwise) and ``dcp.save``, so no rank
ever gathers the whole model to save it; ``dcp.load`` reads each rank's part of whatever layout wrote it, so
a checkpoint resumes on another world size or layout (2 FSDP2 ranks → 1 process, DDP → FSDP2, …; the
trainer state is the same, and the data stream is a function of the global batch, not of the ranks).
``--async-checkpoint`` writes with ``dcp.async_save`` on a separate gloo group (torchtitan's
``async_mode = "async"``): the state is copied to host memory, training goes on, and the checkpoint is
published (manifest, rename, ``latest``) by :meth:`PendingCheckpoint.publish` before the next one starts or
the run ends — a crash meanwhile leaves the previous checkpoint.

Reading is safe on untrusted files: ``train.pt`` and the RNG files with ``weights_only=True``, DCP's
``.metadata`` with an unpickler that only admits DCP's metadata classes (``dcp.FileSystemReader`` uses plain
``pickle.load``), its non-tensor items with ``weights_only=True`` (``DefaultLoadPlanner.load_bytes`` does not).
Checkpoints written before DCP (``train.pt`` with full model and optimizer state dicts) still load.

Integrity: on resume the manifest is checked (a flipped bit or a cut file changes the SHA-256); a
checkpoint that fails it, or cannot be unpickled, is skipped with a warning (logger ``batchpilot.train``)
and the next older ``step-*`` is tried; none good is a one-line error. Checkpoints written before
manifests existed are loaded unchecked. The same selection serves ``--model RUN_DIR``
(:func:`load_model_weights`: the model weights only, for a new run or ``batchpilot noise``).

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
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

from batchpilot.errors import BatchpilotError
from batchpilot.train import dcp_io
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
    files = {p.relative_to(directory).as_posix(): {"sha256": _sha256(p), "size_bytes": p.stat().st_size}
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}
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
                    unchanged: bool = False, asynchronous: bool = False,
                    group: Any = None) -> Path | PendingCheckpoint:
    """Write checkpoint ``step`` atomically (a collective: every rank must call it). ``unchanged``: this
    run already saved or resumed from exactly this state; an existing complete ``step`` is then kept.
    ``asynchronous``: the model and optimizer files are written by ``dcp.async_save`` on ``group`` (a process
    group of its own) in the background, and the returned :class:`PendingCheckpoint` publishes them."""
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
    future = None
    try:
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            torch.save({"scaler": scaler.state_dict(), "state": state}, tmp / "train.pt")
        _agree(env, None, tmp, out)
        torch.save(_rng_state(), tmp / f"rng-rank{env.rank}.pt")
        if asynchronous:
            future = dcp_io.start_async_save(tmp, model, optimizer, group)
        else:
            dcp_io.save(tmp, model, optimizer)
    except (OSError, RuntimeError, ValueError) as exc:
        _agree(env, exc, tmp, out)
    pending = PendingCheckpoint(out=out, tmp=tmp, final=final, env=env, keep=keep, future=future)
    return pending if future is not None else pending.publish()


class PendingCheckpoint:
    """A checkpoint written into ``.tmp-step-…`` that is not yet published (manifest, rename, ``latest``)."""

    def __init__(self, *, out: Path, tmp: Path, final: Path, env: DistEnv, keep: int, future: Any) -> None:
        self.out, self.tmp, self.final, self.env, self.keep, self.future = out, tmp, final, env, keep, future

    def publish(self) -> Path:
        """Wait for the background write (if any), agree that every rank wrote, then manifest, rename and
        ``latest`` on rank 0 (a collective)."""
        error: BaseException | None = None
        if self.future is not None:
            try:
                self.future.result()
            except (Exception, CheckpointException) as exc:  # the writer thread's, re-raised by the future
                error = dcp_io.unwrap(exc)
        _agree(self.env, error, self.tmp, self.out)
        try:
            if self.env.is_main:
                _write_manifest(self.tmp)
        except OSError as exc:
            error = exc
        _agree(self.env, error, self.tmp, self.out)
        if self.env.is_main:
            if self.final.exists():
                shutil.rmtree(self.final)
            os.replace(self.tmp, self.final)
            _point_latest(self.final.parent, self.final.name)
            _prune(self.final.parent, self.keep)
        _barrier(self.env)
        return self.final


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
    legacy = {"model", "optimizer"} <= blob.keys() if isinstance(blob, dict) else False
    if not isinstance(blob, dict) or not {"scaler", "state"} <= blob.keys() or not (legacy or (path / dcp_io.DCP).is_dir()):
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
    _apply(path, blob, rng_state, model=model, optimizer=optimizer, scaler=scaler)
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
        module.load_state_dict(blob["model"] if "model" in blob else dcp_io.read_model_state(path), strict=True)
    except (RuntimeError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise BatchpilotError(f"{who}: the weights in {str(path)!r} do not fit the model built from the run's "
                              f"recorded model config ({detail}); was that config file changed since?") from None
    return path


def _apply(path: Path, blob: dict[str, Any], rng_state: dict[str, Any], *, model: nn.Module,
           optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    if "model" in blob:  # written before DCP: full state dicts in train.pt
        set_state_dict(model, optimizer, model_state_dict=blob["model"], optim_state_dict=blob["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    else:
        dcp_io.load_into(path, model, optimizer)
    scaler.load_state_dict(blob["scaler"]) if blob["scaler"] else None
    _set_rng_state(rng_state)


def load_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, env: DistEnv) -> dict[str, Any]:
    """Restore model, optimizer, scaler and this rank's RNG from ``path`` (checked against its manifest);
    returns the trainer state."""
    blob, rng_state = _read(path, env.rank)
    _apply(path, blob, rng_state, model=model, optimizer=optimizer, scaler=scaler)
    return dict(blob["state"])
