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
import torch
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


def _cli(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "batchpilot.cli", "train", "--data", str(corpus), "--seq-len", "32",
            "--global-batch", "16", "--micro-batch", "4", "--steps", str(STEPS), "--warmup-steps", "2",
            "--checkpoint-every", "2", "--threads", "1", "--out", str(out), "--json", *extra]


@pytest.mark.slow
@pytest.mark.distributed
def test_kill_9_of_an_fsdp2_run_resumes_exactly_on_the_same_and_on_another_world_size(corpus_dir: Path,
                                                                                     tmp_path: Path) -> None:
    """2 FSDP2 ranks (``--nproc 2 --zero 3``) killed with SIGKILL (the launcher's whole process group): the DCP
    checkpoint resumes bit for bit on 2 ranks; on 1 process it restores the same weights bit for bit and
    continues within 1e-6 of the 2-rank losses (another reduction order)."""
    import shutil

    from batchpilot.train.dcp_io import read_model_state
    from batchpilot.train.distributed import CPU_ENV_FOR_TESTS
    from batchpilot.train.loop import Trainer

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    two = ("--nproc", "2", "--zero", "3")
    assert subprocess.run(_cli(corpus_dir, tmp_path / "ref", *two), env=env, capture_output=True,
                          timeout=600).returncode == 0
    expected = [r["loss"] for r in read_metrics(tmp_path / "ref" / "metrics.jsonl")]
    out = tmp_path / "killed"
    victim = subprocess.Popen(_cli(corpus_dir, out, *two), env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_step(out, 7, victim)  # type: ignore[arg-type]
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=60)
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None and checkpoint.name >= "step-00000006"
    assert sorted(p.name for p in (checkpoint / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    shutil.copytree(out, tmp_path / "one")  # the same checkpoint, to resume on one process

    resumed = subprocess.run(_cli(corpus_dir, out, *two, "--resume"), env=env, capture_output=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in records] == expected  # bit-for-bit the uninterrupted 2-rank trajectory

    config = TrainConfig.from_dict(json.loads((tmp_path / "one" / "launch-config.json").read_text()))
    config = config.replace(run={"out": str(tmp_path / "one"), "resume": True, "nproc": 1,
                                 "expected_world_size": None})
    trainer = Trainer(config, CPU_ENV_FOR_TESTS)  # one process, FSDP2 over a group of one: resharded by DCP
    saved = read_model_state(latest_checkpoint(tmp_path / "one") or checkpoint)
    restored = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in trainer.model.state_dict().items()}
    assert all(torch.equal(restored[k], v) for k, v in saved.items())
    try:
        trainer.train()
    finally:
        torch.distributed.destroy_process_group()  # the group of one FSDP2 made in this process
    one = read_metrics(tmp_path / "one" / "metrics.jsonl")
    assert [r["step"] for r in one] == list(range(1, STEPS + 1))
    assert all(abs(a["loss"] - b) <= 1e-6 for a, b in zip(one, expected, strict=True))
