"""A run killed with SIGKILL mid-way resumes onto the uninterrupted loss trajectory; SIGTERM checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import small_config

from batchpilot.train.checkpoint import latest_checkpoint
from batchpilot.train.config import TrainConfig
from batchpilot.train.metrics import read_metrics

STEPS = 12


def _start(config: TrainConfig, folder: Path) -> subprocess.Popen[bytes]:
    path = folder / f"cfg-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(config.to_dict()))
    return subprocess.Popen([sys.executable, "-m", "batchpilot.train.worker", str(path)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen[bytes], timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        records = read_metrics(out / "metrics.jsonl")
        if records and records[-1]["step"] >= step:
            return
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout_s} s")


def _config(corpus: Path, out: Path) -> TrainConfig:
    # throttle nothing: a 12-step run with a checkpoint every 3 steps, on one thread
    return small_config(corpus, out, run={"steps": STEPS, "checkpoint_every": 3},
                        batch={"global_batch_sequences": 16, "micro_batch_sequences": 4})


@pytest.mark.slow
def test_kill_9_then_resume_matches_uninterrupted(corpus_dir: Path, tmp_path: Path) -> None:
    reference = _start(_config(corpus_dir, tmp_path / "ref"), tmp_path)
    assert reference.wait(timeout=600) == 0
    expected = [r["loss"] for r in read_metrics(tmp_path / "ref" / "metrics.jsonl")]
    assert len(expected) == STEPS

    out = tmp_path / "killed"
    victim = _start(_config(corpus_dir, out), tmp_path)
    _wait_for_step(out, 7, victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None and checkpoint.name >= "step-00000006"

    resumed = _start(_config(corpus_dir, out).replace(run={"resume": True}), tmp_path)
    assert resumed.wait(timeout=600) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in records] == expected  # bit-for-bit the same trajectory


@pytest.mark.slow
def test_sigterm_checkpoints_and_stops(corpus_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "term"
    proc = _start(_config(corpus_dir, out).replace(run={"checkpoint_every": 0}), tmp_path)
    _wait_for_step(out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by_signal"] == "SIGTERM" and summary["steps"] < STEPS
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None and checkpoint.name == f"step-{summary['steps']:08d}"
