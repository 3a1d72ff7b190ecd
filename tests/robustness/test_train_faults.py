"""Faults during training, for real: signals, ``kill -9`` at random moments, a full disk while
checkpointing, a corrupt checkpoint. Each test runs the installed ``batchpilot train`` in its own
process (tiny-llama-1m, 32-token sequences, CPU) and checks what is left on disk.

The file size limit (RLIMIT_FSIZE) stands in for a full disk: it needs no privileges and no mount, and a
write past it fails with EFBIG exactly where ENOSPC would (Python ignores SIGXFSZ, so the process is not
killed but sees the error).
"""

from __future__ import annotations

import contextlib
import json
import random
import resource
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch

from batchpilot.train.dcp_io import read_model_state

from ._checks import assert_one_line_error
from ._train import latest_step, load_latest, metrics, run, start, stop, train_args, wait_for, write_corpus

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
SHARD = "dcp/__0_0.distcp"
"""The model and optimizer file a one-process run writes (torch.distributed.checkpoint's first rank's file)."""


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus.txt")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_checkpoints_then_exits_cleanly(tmp_path: Path, corpus: Path, signum: int) -> None:
    out = tmp_path / "run"
    proc = start(train_args(corpus, out, steps=100_000))
    wait_for(lambda: len(metrics(out)) >= 3, proc)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by_signal"] == signal.Signals(signum).name
    steps = summary["steps"]
    assert latest_step(out) == steps == metrics(out)[-1]["step"]  # the step in flight finished, then saved
    assert load_latest(out)["state"]["train"]["step"] == steps
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_kill_9_at_random_moments_never_loses_the_last_checkpoint(tmp_path: Path, corpus: Path) -> None:
    """Checkpoint every step (so a kill often lands mid-write), SIGKILL at a random moment, resume; 3 times."""
    out, rng = tmp_path / "run", random.Random(1234)
    seen: list[int] = []
    for attempt in range(3):
        before = latest_step(out) or 0
        proc = start(train_args(corpus, out, steps=100_000, checkpoint_every=1, resume=attempt > 0))
        wait_for(lambda before=before: (latest_step(out) or 0) >= before + 1, proc)
        time.sleep(rng.uniform(0.0, 1.5))
        stop(proc)  # kill -9 of the whole process group
        step = latest_step(out)
        assert step is not None and step >= before + 1  # resume continued from the last checkpoint
        assert load_latest(out)["state"]["train"]["step"] == step  # complete, loads with weights_only=True
        seen.append(step)
    final = seen[-1] + 2
    done = run(train_args(corpus, out, steps=final, resume=True))
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == final
    assert metrics(out)[-1]["step"] == final


def _file_size_limit(limit_bytes: int):  # type: ignore[no-untyped-def]
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path: Path, corpus: Path) -> None:
    out = tmp_path / "run"
    first = run(train_args(corpus, out, steps=3))
    assert first.returncode == 0, first.stderr
    assert latest_step(out) == 3
    size = (out / "checkpoints" / "step-00000003" / SHARD).stat().st_size
    # Resume with files capped at a quarter of the model shard: metrics lines fit, the next checkpoint does not.
    full = run(train_args(corpus, out, steps=6, checkpoint_every=1, resume=True), preexec_fn=_file_size_limit(size // 4))
    assert full.returncode == 2, full.stderr
    assert_one_line_error(full.stderr, "cannot write checkpoint", ".tmp-step-00000004",
                          "no space left on the device or file too large", "step-00000003' is kept")
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the partial checkpoint was removed
    assert latest_step(out) == 3  # the pointer still names the previous, complete checkpoint
    assert load_latest(out)["state"]["train"]["step"] == 3
    again = run(train_args(corpus, out, steps=5, resume=True))  # space is back: resume from step 3
    assert again.returncode == 0, again.stderr
    assert latest_step(out) == 5


def test_truncated_checkpoint_is_detected_with_one_line(tmp_path: Path, corpus: Path) -> None:
    out = tmp_path / "run"
    assert run(train_args(corpus, out, steps=2)).returncode == 0
    ckpt = out / "checkpoints" / "step-00000002" / SHARD
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    resumed = run(train_args(corpus, out, steps=4, resume=True))  # the only checkpoint: nothing to fall back on
    assert resumed.returncode == 2
    assert_one_line_error(resumed.stderr, "none of the 1 checkpoints", "step-00000002", f"{SHARD} has")


def _flip_bytes(path: Path, count: int, seed: int) -> None:
    """XOR ``count`` bytes in the middle half of the file (the tensor data, not the zip directory)."""
    data, rng = bytearray(path.read_bytes()), random.Random(seed)
    for i in rng.sample(range(len(data) // 4, 3 * len(data) // 4), count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_latest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, corpus: Path) -> None:
    """64 bytes flipped inside the newest checkpoint's model shard (``dcp/__0_0.distcp``, tensor data that
    would still load): the SHA-256 catches it, resume says so on one warning line and continues from the
    previous checkpoint, reproducing the uninterrupted run's losses from there."""
    out = tmp_path / "run"
    assert run(train_args(corpus, out, steps=6, checkpoint_every=2)).returncode == 0  # keeps steps 4 and 6
    before = metrics(out)
    _flip_bytes(out / "checkpoints" / "step-00000006" / SHARD, 64, seed=7)
    resumed = run(train_args(corpus, out, steps=6, resume=True))
    assert resumed.returncode == 0, resumed.stderr
    warnings = [line for line in resumed.stderr.splitlines() if line.strip()]
    assert len(warnings) == 1 and warnings[0].startswith("warning: "), resumed.stderr
    assert "step-00000006" in warnings[0] and "SHA-256" in warnings[0] and "step-00000004" in warnings[0]
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # steps 5-6 were retrained from step 4
    assert [r["loss"] for r in rows] == [r["loss"] for r in before]  # exactly as before the corruption
    # Every kept checkpoint is corrupt: one line, exit 2.
    for step in (4, 6):
        path = out / "checkpoints" / f"step-{step:08d}" / SHARD
        if path.exists():
            _flip_bytes(path, 64, seed=step)
    again = run(train_args(corpus, out, steps=8, resume=True))
    assert again.returncode == 2
    assert_one_line_error(again.stderr, "none of the 2 checkpoints", "SHA-256")


def test_non_finite_steps_are_skipped_then_the_run_stops_keeping_a_finite_checkpoint(tmp_path: Path,
                                                                                     corpus: Path) -> None:
    """``--lr 1e30 --grad-clip 0``: step 1 is finite (initial weights) but its update is ~1e29 per weight, so
    every later gradient norm overflows; those steps are skipped (logged), and after --max-bad-steps 3 in a
    row the run stops in one line with exit 2, leaving the step-1 checkpoint (finite weights) as latest."""
    out = tmp_path / "run"
    done = run(train_args(corpus, out, steps=50, checkpoint_every=1,
                          extra=["--lr", "1e30", "--grad-clip", "0", "--max-bad-steps", "3"]))
    assert done.returncode == 2, done.stderr
    assert_one_line_error(done.stderr, "non-finite", "--max-bad-steps 3", "step-00000001")
    rows = metrics(out)
    assert "skipped" not in rows[0] and all(r["skipped"] == "non-finite" for r in rows[1:])
    assert len(rows) == 1 + 3
    assert latest_step(out) == 1 and sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000001"]
    blob = load_latest(out)
    assert blob["state"]["train"]["step"] == 1
    weights = read_model_state(out / "checkpoints" / "step-00000001")
    assert weights and all(bool(torch.isfinite(t).all()) for t in weights.values())
    resumed = run(train_args(corpus, out, steps=3, resume=True, extra=["--lr", "1e-3"]))  # a sane LR resumes
    assert resumed.returncode == 0, resumed.stderr


def _workers(proc_pid: int) -> list[psutil.Process]:
    """The rank processes (torchrun's children with a LOCAL_RANK; torchrun itself has none)."""
    found = []
    for p in psutil.Process(proc_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "LOCAL_RANK" in p.environ():
                found.append(p)
    return found


def _kill_all(processes: list[psutil.Process]) -> None:
    for p in processes:
        with contextlib.suppress(psutil.Error):
            p.kill()


@contextlib.contextmanager
def _two_ranks_after_a_checkpoint(args: list[str], out: Path, every: int):  # type: ignore[no-untyped-def]
    """Start ``batchpilot train --nproc 2 …``, wait for its first checkpoint, and yield (launcher, ranks,
    every process of the job); whatever is still alive at the end is killed."""
    proc = start(args)
    family = [psutil.Process(proc.pid)]
    try:
        wait_for(lambda: (latest_step(out) or 0) >= every, proc, timeout_s=300)
        family += psutil.Process(proc.pid).children(recursive=True)
        workers = _workers(proc.pid)
        assert sorted(w.environ()["LOCAL_RANK"] for w in workers) == ["0", "1"]
        yield proc, workers, family
    finally:
        _kill_all(family)


def _rank(workers: list[psutil.Process], local_rank: str) -> psutil.Process:
    return next(w for w in workers if w.environ()["LOCAL_RANK"] == local_rank)


@pytest.mark.distributed
def test_a_rank_dying_under_torchrun_stops_the_job_and_resume_continues(tmp_path: Path, corpus: Path) -> None:
    """Two CPU ranks (gloo); rank 1 is SIGKILLed mid-run: the job ends, no worker is left, --resume goes on."""
    out = tmp_path / "run"
    args = train_args(corpus, out, steps=100_000, checkpoint_every=2, extra=["--nproc", "2"])
    with _two_ranks_after_a_checkpoint(args, out, every=2) as (proc, workers, _):
        _rank(workers, "1").send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 2
        assert_one_line_error(stderr.strip().splitlines()[-1], "torchrun with 2 processes exited with code")
        deadline = time.monotonic() + 30  # torchrun stops the surviving rank
        while any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers):
            assert time.monotonic() < deadline, "a rank outlived the job"
            time.sleep(0.2)
    step = latest_step(out)
    assert step is not None and step >= 2
    assert load_latest(out)["state"]["train"]["step"] == step
    done = run(train_args(corpus, out, steps=step + 2, resume=True, extra=["--nproc", "2"]), timeout_s=400)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == step + 2


@pytest.mark.distributed
def test_torchrun_elastic_restart_resumes_from_the_last_checkpoint(tmp_path: Path, corpus: Path) -> None:
    """``--nproc 2 --max-restarts 1``: rank 1 is SIGKILLed after a checkpoint; torchrun restarts both ranks,
    which resume from the last checkpoint (no --resume given) and finish; every step is in ``metrics.jsonl``
    once, with the losses of an uninterrupted two-rank run."""
    steps, every = 40, 2
    common = ["--nproc", "2", "--lr-decay", "constant"]
    reference = run(train_args(corpus, tmp_path / "reference", steps=steps, checkpoint_every=every, extra=common),
                    timeout_s=400)
    assert reference.returncode == 0, reference.stderr[-2000:]
    out = tmp_path / "run"
    args = train_args(corpus, out, steps=steps, checkpoint_every=every, extra=[*common, "--max-restarts", "1"])
    with _two_ranks_after_a_checkpoint(args, out, every=every) as (proc, workers, _):
        killed_after = latest_step(out)
        _rank(workers, "1").send_signal(signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 0, stderr[-3000:]
    assert killed_after is not None and killed_after < steps
    summary = json.loads(stdout)
    assert summary["steps"] == steps and summary["elastic_restarts"] == 1
    assert "elastic restart 1 (torchrun --max-restarts): resuming from" in stderr
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in metrics(tmp_path / "reference")]
    assert not (out / "error.txt").exists()


@pytest.mark.distributed
def test_kill_9_of_the_launcher_takes_the_ranks_with_it(tmp_path: Path, corpus: Path) -> None:
    """SIGKILL to the ``batchpilot train --nproc 2`` process group (torchrun is in it; the ranks are in
    their own sessions): PR_SET_PDEATHSIG in torchrun and in each rank ends the whole tree."""
    out = tmp_path / "run"
    args = train_args(corpus, out, steps=100_000, checkpoint_every=2, extra=["--nproc", "2"])
    with _two_ranks_after_a_checkpoint(args, out, every=2) as (proc, _, family):
        stop(proc)  # kill -9 of the launcher's process group
        deadline = time.monotonic() + 30
        while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family):
            assert time.monotonic() < deadline, "a process of the job outlived the launcher"
            time.sleep(0.2)
