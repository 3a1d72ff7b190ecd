"""Helpers for the trainer fault tests: a tiny corpus, a real ``batchpilot train`` process, polling."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ._checks import BATCHPILOT

WORDS = ("alpha", "beta", "gamma", "delta", "the", "of", "and", "batch", "size", "token")


def write_corpus(path: Path, documents: int = 200, seed: int = 0) -> Path:
    """A small plain-text corpus (one document per line) so start-up, not data, dominates."""
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(documents)))
    return path


def train_args(corpus: Path, out: Path, *, steps: int, checkpoint_every: int = 0, resume: bool = False,
               extra: Sequence[str] = ()) -> list[str]:
    args = [str(BATCHPILOT), "train", "--model", "tiny-llama-1m", "--data", str(corpus), "--seq-len", "32",
            "--global-batch", "4", "--micro-batch", "2", "--steps", str(steps), "--warmup-steps", "1",
            "--checkpoint-every", str(checkpoint_every), "--out", str(out), "--threads", "1", "--device", "cpu",
            "--json", *extra]
    return [*args, "--resume"] if resume else args


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}


def start(args: Sequence[str], *, preexec_fn: Callable[[], None] | None = None,
          new_session: bool = True) -> subprocess.Popen[str]:
    return subprocess.Popen(list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            preexec_fn=preexec_fn, start_new_session=new_session)


def run(args: Sequence[str], *, timeout_s: float = 240, preexec_fn: Callable[[], None] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, env=env(), timeout=timeout_s,
                          preexec_fn=preexec_fn, check=False)


def metrics(out: Path) -> list[dict[str, Any]]:
    """Complete lines of ``metrics.jsonl`` (a torn last line is ignored)."""
    path = out / "metrics.jsonl"
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    return rows


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[str], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the trainer exited early ({proc.returncode}): {proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the trainer")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[str], signum: int = signal.SIGKILL) -> None:
    """Signal the trainer's whole process group (torchrun workers included) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signum)
    proc.communicate(timeout=120)


def latest_step(out: Path) -> int | None:
    pointer = out / "checkpoints" / "latest"
    return int(pointer.read_text().strip().split("-")[1]) if pointer.exists() else None


def load_latest(out: Path) -> dict[str, Any]:
    """The checkpoint ``latest`` names, loaded the way resume loads it (``weights_only=True``)."""
    name = (out / "checkpoints" / "latest").read_text().strip()
    blob: dict[str, Any] = torch.load(out / "checkpoints" / name / "train.pt", map_location="cpu", weights_only=True)
    return blob
