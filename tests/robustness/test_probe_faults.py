"""Faults inside probe trials, for real: an allocator OOM under RLIMIT_AS, a trial process killed with
SIGKILL (what the kernel's OOM killer sends), a hung trial that started a grandchild. After each, no
process of the trial's group may be left running.

The trials are the real :class:`~batchpilot.measure.cpu_runner.CpuTrialRunner` processes. For the SIGKILL and
hang cases the trial body is replaced (the runner forks, so the child runs the patched function) by one
that does what those faults do: report its memory limit, then die by SIGKILL, or start ``sleep`` in its
own process group and block.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from batchpilot.errors import BatchpilotError
from batchpilot.measure import _trial, cpu_runner
from batchpilot.measure.predict import Prediction
from batchpilot.measure.probe import run_probe
from batchpilot.measure.probe_types import ProbeRequest
from batchpilot.specs.model import load_model
from batchpilot.specs.settings import RunSettings
from batchpilot.units import MIB

pytestmark = pytest.mark.timeout(300)


def _request(budget_bytes: int, timeout_s: float = 120.0, seq_len: int = 64) -> ProbeRequest:
    return ProbeRequest(model=load_model("tiny-llama-1m"), settings=RunSettings(precision="fp32"), seq_len=seq_len,
                        device="cpu", budget_bytes=budget_bytes, knee=False, trial_timeout_s=timeout_s, cap=64)


@pytest.fixture()
def fork_trials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trial processes are forked from this one, so a patched trial body is what they run.

    A real trial body run in such a child uses one intra-op thread: once this (long-lived) test process has
    run a parallel torch op, a forked child hangs in its first parallel region (OpenMP's pool does not
    survive fork — why the probe forks from a fork server; measured: a 2-thread matmul in the parent,
    then one in the child, never returns, unless the child sets one thread first)."""
    monkeypatch.setattr(cpu_runner, "_trial_context", lambda model_type: multiprocessing.get_context("fork"))
    real = _trial.run_cpu_trial

    def single_threaded(spec: Any, on_limit_set: Any = None) -> Any:
        import torch

        torch.set_num_threads(1)
        return real(spec, on_limit_set)

    monkeypatch.setattr(_trial, "run_cpu_trial", single_threaded)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper that never comes in some containers counts as dead)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _live_descendants() -> set[tuple[int, float]]:
    """(pid, start time) of every live descendant of this process (a reused pid is a different process)."""
    out = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                out.add((child.pid, child.create_time()))
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.fixture()
def children_before() -> set[tuple[int, float]]:
    """The descendants alive before the test: long-lived helpers an earlier test in the same session left
    (a multiprocessing fork server and its resource tracker) are not this test's orphans."""
    return _live_descendants()


def _no_children_left(before: set[tuple[int, float]], wait_s: float = 10.0) -> None:
    """No descendant this test created is still alive (after up to ``wait_s`` for the dying to go).
    multiprocessing's resource tracker, started with the first fork server of this pytest process, lives
    as long as the process by design (it is the one helper a test may be the first to start)."""
    deadline = time.monotonic() + wait_s
    while True:
        new = {(pid, t) for pid, t in _live_descendants() - before
               if "multiprocessing.resource_tracker" not in _name(pid)}
        if not new or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not new, [(pid, _name(pid)) for pid, _ in new]


def _name(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline()) or psutil.Process(pid).name()
    except psutil.Error:
        return "?"


def test_the_orphan_check_counts_only_processes_started_during_the_test() -> None:
    """The check itself: a helper alive before the snapshot is ignored; one started after it is an orphan."""
    older = subprocess.Popen(["sleep", "60"])
    try:
        before = _live_descendants()
        _no_children_left(before, wait_s=0.5)  # passes although `older` is alive
        orphan = subprocess.Popen(["sleep", "60"])
        try:
            with pytest.raises(AssertionError, match=str(orphan.pid)):
                _no_children_left(before, wait_s=0.5)
        finally:
            orphan.kill()
            orphan.wait()
        _no_children_left(before, wait_s=0.5)  # reaped: nothing left again
    finally:
        older.kill()
        older.wait()


@pytest.mark.slow
def test_real_allocator_oom_is_does_not_fit_and_the_search_goes_on(children_before: set[tuple[int, float]]) -> None:
    """A budget the analytic model overshoots: the first trials fail for real (RLIMIT_AS), smaller ones fit.

    Trials start from the real fork server (no patched body here): a plain fork of this long-lived test
    process would inherit its heap's free space, and allocations reusing it never meet the address-space
    limit — the order-dependent failure this avoids."""
    result = run_probe(_request(budget_bytes=24 * MIB), predictor=lambda req: Prediction(max_micro_batch=32))
    failed = [t for t in result.trials if not t.fits]
    assert failed, result.trials
    assert all(t.error and "memory" in t.error.lower() for t in failed), failed
    assert 1 <= result.max_micro_batch < min(t.micro_batch for t in failed)
    assert all(t.fits == (t.micro_batch <= result.max_micro_batch) for t in result.trials)
    multiprocessing.forkserver._forkserver._stop()  # type: ignore[attr-defined]  # kept for reuse by design
    _no_children_left(children_before)


def _killed_by_oom_killer(real: Any, threshold: int) -> Any:
    def trial(spec: Any, on_limit_set: Any = None) -> Any:
        if spec.micro_batch < threshold:
            return real(spec, on_limit_set)
        if on_limit_set:
            on_limit_set(123)  # the limit is set, the step starts ... and the kernel kills the process
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")
    return trial


def test_trial_killed_by_sigkill_is_does_not_fit(monkeypatch: pytest.MonkeyPatch, fork_trials: None,
                                                 children_before: set[tuple[int, float]]) -> None:
    monkeypatch.setattr(_trial, "run_cpu_trial", _killed_by_oom_killer(_trial.run_cpu_trial, threshold=3))
    result = run_probe(_request(budget_bytes=2048 * MIB), predictor=lambda req: Prediction(max_micro_batch=4))
    killed = [t for t in result.trials if not t.fits]
    assert killed and all(t.micro_batch >= 3 for t in killed)
    assert all("exit code -9" in (t.error or "") for t in killed), killed
    assert result.max_micro_batch == 2  # the search went on below the killed sizes
    _no_children_left(children_before)


def _hangs_with_a_grandchild(pid_file: Path, real: Any = None, threshold: int = 1) -> Any:
    """A trial body that, from micro-batch ``threshold`` up, starts ``sleep`` in its process group and
    blocks (smaller sizes run ``real``); the pids of the last hung trial and its grandchild go to ``pid_file``."""
    def trial(spec: Any, on_limit_set: Any = None) -> Any:
        if spec.micro_batch < threshold:
            return real(spec, on_limit_set)
        child = subprocess.Popen(["sleep", "1000"])  # in the trial's process group
        pid_file.write_text(f"{os.getpid()} {child.pid}")
        time.sleep(1000)
        raise AssertionError("unreachable")
    return trial


def _group_is_gone(pid_file: Path) -> None:
    trial_pid, sleeper_pid = map(int, pid_file.read_text().split())
    deadline = time.monotonic() + 10
    while (_alive(trial_pid) or _alive(sleeper_pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(trial_pid) and not _alive(sleeper_pid)  # the grandchild died with the group


@pytest.mark.slow
def test_hung_trial_is_does_not_fit_and_the_search_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          fork_trials: None,
                                                          children_before: set[tuple[int, float]]) -> None:
    """Sizes ≥ 2 hang (with a grandchild): each is killed with its group after the timeout, recorded as not
    fitting with the reason, and the search goes down to micro-batch 1, which runs for real and fits.

    The timeout leaves the real micro-batch-1 trial room on a loaded 2-core machine (a cold one needs
    several seconds to import the modelling code; it is imported here first, so the forked trial has it)."""
    import transformers.models.llama.modeling_llama  # noqa: F401  # warm: the forked child inherits it

    pids = tmp_path / "pids"
    monkeypatch.setattr(_trial, "run_cpu_trial", _hangs_with_a_grandchild(pids, _trial.run_cpu_trial, threshold=2))
    start = time.monotonic()
    result = run_probe(_request(budget_bytes=256 * MIB, timeout_s=20), predictor=lambda req: Prediction(max_micro_batch=2))
    assert time.monotonic() - start < 180
    hung = [t for t in result.trials if t.micro_batch >= 2]
    assert hung and all(not t.fits and t.peak_bytes is None for t in hung), result.trials
    assert all(t.error == f"trial ran past --trial-timeout 20 s at micro-batch {t.micro_batch} and was killed"
               for t in hung), hung
    assert all(t.seconds >= 20 for t in hung)
    assert result.max_micro_batch == 1
    assert [t.fits for t in result.trials if t.micro_batch == 1] == [True]
    _group_is_gone(pids)
    _no_children_left(children_before)


def test_every_size_hanging_is_one_line_naming_the_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           fork_trials: None,
                                                           children_before: set[tuple[int, float]]) -> None:
    pids = tmp_path / "pids"
    monkeypatch.setattr(_trial, "run_cpu_trial", _hangs_with_a_grandchild(pids))
    with pytest.raises(BatchpilotError) as caught:
        run_probe(_request(budget_bytes=256 * MIB, timeout_s=2), predictor=lambda req: Prediction(max_micro_batch=2))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("not even micro-batch 1 of tiny-llama-1m at --seq-len 64 finished on cpu")
    assert "ran past --trial-timeout 2 s at micro-batch 1" in message and "raise --trial-timeout" in message
    _group_is_gone(pids)
    _no_children_left(children_before)


def test_interrupt_during_a_trial_leaves_no_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    fork_trials: None, children_before: set[tuple[int, float]]) -> None:
    """Ctrl-C while a trial runs: the trial's group is killed on the way out."""
    pids = tmp_path / "pids"
    monkeypatch.setattr(_trial, "run_cpu_trial", _hangs_with_a_grandchild(pids))

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 2.0)
        with pytest.raises(KeyboardInterrupt):
            run_probe(_request(budget_bytes=256 * MIB, timeout_s=100), predictor=lambda req: Prediction(max_micro_batch=2))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    _group_is_gone(pids)
    _no_children_left(children_before)
