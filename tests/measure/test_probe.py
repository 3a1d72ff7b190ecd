"""The probe around the search: injected runners (exact trials, knee, JSON), then real CPU trials.

Fake-runner numbers are derived by hand in the comments. The real tests run the tiny preset under a
small budget and check what must hold whatever the machine: the reported maximum fitted under the
limit, the size above it really failed with the allocator's error, and the calibration file loads.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from batchpilot.errors import BatchpilotError, InfeasibleError
from batchpilot.estimate.calibration import load_calibration
from batchpilot.measure.calibrate import calibration_from_probe
from batchpilot.measure.cpu_runner import _to_trial
from batchpilot.measure.predict import Prediction
from batchpilot.measure.probe import find_knee, knee_ladder, run_probe
from batchpilot.measure.probe_types import ProbeError, ProbeRequest, trial_spec, worst_case_seq_len
from batchpilot.measure.trace import TRACE_ENV, trace
from batchpilot.records.probe import ProbeResult, ProbeTrial
from batchpilot.specs.model import load_model
from batchpilot.specs.settings import RunSettings

MIB = 2**20
SEQ = 64


def _step_seconds(b: int) -> float:
    """A CPU-like step time: fixed cost, linear work, and a quadratic penalty (cache pressure)."""
    return 0.1 + 0.02 * b + 0.002 * b * b


class FakeRunner:
    """peak(b) = 20 MiB + 50 MiB·b; fits under 1024 MiB up to L = 20; tokens/s = b·64 / step_seconds(b)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, micro_batch: int) -> ProbeTrial:
        self.calls.append(micro_batch)
        peak = 20 * MIB + 50 * MIB * micro_batch
        fits = peak <= 1024 * MIB
        return ProbeTrial(micro_batch=micro_batch, fits=fits, peak_bytes=peak if fits else None,
                          tokens_per_s=micro_batch * SEQ / _step_seconds(micro_batch) if fits else None,
                          seconds=1.0)


def _request(**kw: object) -> ProbeRequest:
    base: dict[str, object] = dict(model=load_model("tiny-llama-1m"), settings=RunSettings(precision="fp32"),
                                   seq_len=SEQ, device="cpu", budget_bytes=1024 * MIB)
    base.update(kw)
    return ProbeRequest(**base)  # type: ignore[arg-type]


def test_exact_prediction_two_search_trials_then_the_knee_ladder() -> None:
    runner = FakeRunner()
    result = run_probe(_request(), runner=runner,
                       predictor=lambda r: Prediction(max_micro_batch=20, bytes_per_sequence=50 * MIB))
    # search: 20 fits, line says 20, confirm 21 fails; knee ladder 20 → 10, 5, 2, 1.
    assert runner.calls == [20, 21, 10, 5, 2, 1]
    assert result.max_micro_batch == 20 and result.search_trials == 2
    assert [t.phase for t in result.trials] == ["search"] * 2 + ["knee"] * 4
    # tokens/s = 64b/(0.1 + 0.02b + 0.002b²): b=5 → 320/0.25 = 1280, b=10 → 640/0.5 = 1280,
    # b=20 → 1280/1.3 = 984.6, b=2 → 864.9, b=1 → 524.6. Best 1280; smallest within 3 %: 5.
    assert result.knee_micro_batch == 5


def test_prediction_twice_too_high_and_an_int_predictor() -> None:
    runner = FakeRunner()
    result = run_probe(_request(knee=False), runner=runner, predictor=lambda r: 40)
    # 40 ✗, step down 39 ✗, halve → 19 fits at 970 MiB; origin line 19·1024/970 = 20.06 → 20 fits;
    # two-point line says 20 ≤ lo → confirm 21 fails.
    assert runner.calls == [40, 39, 19, 20, 21]
    assert result.max_micro_batch == 20 and result.predicted_max_micro_batch == 40
    # measured sizes 19 and 20: 19·64/(0.1 + 0.38 + 0.722) = 1011.6 tokens/s beats 20's 984.6 → knee 19
    assert result.knee_micro_batch == 19


def test_json_contract() -> None:
    result = run_probe(_request(knee=False), runner=FakeRunner(), predictor=lambda r: 20)
    record = json.loads(json.dumps(result.to_dict()))
    for key in ("max_micro_batch", "knee_micro_batch", "predicted_max_micro_batch", "search_trials", "trials",
                "device", "budget_bytes"):
        assert key in record
    assert set(record["trials"][0]) >= {"micro_batch", "fits", "peak_bytes", "tokens_per_s", "seconds"}
    assert record["budget_bytes"] == 1024 * MIB and record["device"] == "cpu"
    assert record["schema_version"] == ProbeResult.SCHEMA_VERSION and ProbeResult.from_dict(record) == result


def test_nothing_fits_is_a_one_line_infeasible_error() -> None:
    def never(micro_batch: int) -> ProbeTrial:
        return ProbeTrial(micro_batch=micro_batch, fits=False, peak_bytes=None, tokens_per_s=None, seconds=0.1,
                          error="DefaultCPUAllocator: can't allocate memory")

    with pytest.raises(InfeasibleError, match=r"not even micro-batch 1 .* --memory-budget") as info:
        run_probe(_request(), runner=never, predictor=lambda r: 4)
    assert "\n" not in str(info.value)


def test_find_knee_and_ladder() -> None:
    def t(b: int, tps: float | None, fits: bool = True) -> ProbeTrial:
        return ProbeTrial(micro_batch=b, fits=fits, peak_bytes=1, tokens_per_s=tps, seconds=1.0)

    assert find_knee([t(1, 100.0), t(2, 196.0), t(4, 200.0), t(8, 150.0)]) == 2  # 196 ≥ 0.97·200 = 194
    assert find_knee([t(1, 100.0), t(2, 193.0), t(4, 200.0)]) == 4  # 193 < 194
    assert find_knee([t(3, None, fits=False)]) == 0
    assert knee_ladder(20, {20, 10}) == [5, 2, 1]
    assert knee_ladder(1, {1}) == []


def test_trace_is_off_without_the_variable_and_one_json_line_per_event_with_it(tmp_path, monkeypatch) -> None:
    path = tmp_path / "trace.jsonl"
    monkeypatch.delenv(TRACE_ENV, raising=False)
    trace("spawn", 3)
    assert not path.exists()
    monkeypatch.setenv(TRACE_ENV, str(path))
    before = time.time()
    trace("spawn", 3)
    trace("search-end")
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert first["event"] == "spawn" and first["micro_batch"] == 3 and first["pid"] == os.getpid()
    assert before <= first["t"] <= second["t"] <= time.time() and second["micro_batch"] is None
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "no-such-dir" / "trace.jsonl"))
    trace("spawn", 3)  # an unwritable trace is skipped, never an error


def test_worst_case_seq_len() -> None:
    assert worst_case_seq_len([100, 900, 300]) == 900
    assert worst_case_seq_len([100, 900, 300], cap=512) == 512
    with pytest.raises(BatchpilotError):
        worst_case_seq_len([])


@pytest.mark.parametrize(("settings", "match"), [
    (RunSettings(precision="fp8"), "--precision fp8"),
    (RunSettings(recompute="selective"), "--recompute selective"),
    (RunSettings(tp=2), "one device"),
])
def test_unsupported_settings_are_refused(settings: RunSettings, match: str) -> None:
    with pytest.raises(ProbeError, match=match):
        _request(settings=settings)


def test_trial_process_outcomes() -> None:
    died_under_limit = _to_trial(7, [("limit", 123)], -9, 2.0)
    assert not died_under_limit.fits and "died under the memory limit" in (died_under_limit.error or "")
    with pytest.raises(ProbeError, match="before its memory limit"):
        _to_trial(7, [], 1, 2.0)
    with pytest.raises(ProbeError, match="ValueError: boom"):
        _to_trial(7, [("limit", 1), ("error", "ValueError: boom")], 0, 2.0)


def test_calibration_efficiency_is_tokens_times_flops_over_peak(tmp_path) -> None:
    request = _request(knee=False)
    result = run_probe(request, runner=FakeRunner(), predictor=lambda r: 20)
    peak = 1e12
    cal = calibration_from_probe(result, request, peak_flops_per_s=peak, accelerator="cpu",
                                 analytic_bytes=lambda b: 50 * MIB * b)
    flops = request.model.flops_per_token(SEQ)
    # the one fitted size, 20: tokens/s = 1280/1.3; memory gap = (20 + 50·20) − 50·20 MiB = 20 MiB
    (point,) = cal.points
    assert point.tokens_per_micro_batch == 20 * SEQ
    assert math.isclose(point.efficiency, (1280 / 1.3) * flops / peak)
    assert cal.memory_overhead_bytes == 20 * MIB


def test_full_recompute_calibration_counts_one_more_layer_forward_and_round_trips() -> None:
    """With full recompute the efficiency counts the layers' forward again but not the head's:
    tiny-llama-1m at s = 64 executes 7,995,392 FLOPs per token (6,094,848 model FLOPs + 1,769,472 layer
    matmuls + 131,072 attention core; hand-derived in tests/plan/test_steptime.py), not 4/3 × 6,094,848.
    The step-time model, given that calibration, turns it back into the measured tokens/s."""
    from batchpilot.estimate.steptime import StepTimeModel
    from batchpilot.specs.batch import BatchTriad
    from batchpilot.specs.hardware import ClusterSpec, load_accelerator

    settings = RunSettings(precision="fp32", recompute="full")
    request = _request(knee=False, settings=settings)
    result = run_probe(request, runner=FakeRunner(), predictor=lambda r: 20)
    gpu = load_accelerator("h100-sxm")
    peak = gpu.peak_flops_per_s("fp32")
    cal = calibration_from_probe(result, request, peak_flops_per_s=peak, accelerator=gpu.name)
    (point,) = cal.points
    tokens_per_s = 1280 / 1.3  # FakeRunner at b = 20
    assert math.isclose(point.efficiency, tokens_per_s * 7_995_392 / peak)
    model = StepTimeModel(request.model, ClusterSpec(accelerator=gpu, devices_per_node=1), seq_len=SEQ,
                          calibration=cal)
    triad = BatchTriad(micro_batch_sequences=20, grad_accum_steps=1, data_parallel_ranks=1, seq_len_tokens=SEQ)
    assert math.isclose(model.estimate(settings, triad).compute_s, 20 * SEQ / tokens_per_s)


# ------------------------------------------------------------------------------------------ real CPU
def test_real_cpu_probe_of_the_tiny_preset(cli_runner, tmp_path, monkeypatch) -> None:
    """Real trials: tiny-llama-1m, seq 64, 48 MiB above the baseline (≈ 10 s on 2 cores); with the trace on."""
    from batchpilot.cli import app

    cal_path = tmp_path / "cal.json"
    trace_path = tmp_path / "trace.jsonl"
    monkeypatch.setenv(TRACE_ENV, str(trace_path))
    res = cli_runner.invoke(app, ["probe", "--model", "tiny-llama-1m", "--seq-len", "64", "--memory-budget",
                                  "48MiB", "--device", "cpu", "--precision", "fp32", "--attention", "eager",
                                  "--no-knee", "--calibration-out", str(cal_path), "--json"])
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout)
    best = record["max_micro_batch"]
    by_size = {t["micro_batch"]: t for t in record["trials"]}
    assert best >= 1 and by_size[best]["fits"]
    assert 0 < by_size[best]["peak_bytes"] <= 48 * MIB  # the peak is what the limit constrained
    assert by_size[best]["tokens_per_s"] > 0
    assert not by_size[best + 1]["fits"]  # the search always establishes the failing neighbour
    assert "can't allocate memory" in by_size[best + 1]["error"] or "died under" in by_size[best + 1]["error"]
    assert record["search_trials"] == len(record["trials"]) <= 4
    cal = load_calibration(cal_path)
    assert cal.accelerator == "cpu" and cal.points and cal.memory_overhead_bytes is not None
    # the trace: the parent's and every trial process's phases, on one clock, in order per process
    lines = [json.loads(line) for line in trace_path.read_text().splitlines()]
    parent = {r["pid"] for r in lines if r["event"] == "probe-start"}
    events = {(r["event"], r["micro_batch"]) for r in lines if r["pid"] not in parent}
    assert {("limit-set", best), ("step-0-end", best), ("step-1-end", best), ("failed", best + 1)} <= events
    for pid in {r["pid"] for r in lines}:
        times = [r["t"] for r in lines if r["pid"] == pid]
        assert times == sorted(times)
    # a CPU calibration never calibrates a GPU plan: one line, exit 2
    plan = cli_runner.invoke(app, ["plan", "--model", "tiny-llama-1m", "--gpu", "rtx-4090", "--gpus", "1",
                                   "--seq-len", "64", "--global-batch", "8", "--calibration", str(cal_path)])
    assert plan.exit_code == 2 and plan.stdout == ""
    (line,) = plan.stderr.strip().splitlines()
    assert "this machine's CPU" in line and "--gpu rtx-4090" in line


def test_bad_budget_is_a_one_line_error(cli_runner) -> None:
    from batchpilot.cli import app

    res = cli_runner.invoke(app, ["probe", "--model", "tiny-llama-1m", "--memory-budget", "lots", "--device", "cpu"])
    assert res.exit_code == 2
    assert "--memory-budget" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def _session_members(sid: int) -> list[tuple[int, int]]:
    """(pid, pgid) of every live process in session ``sid`` (from /proc/PID/stat)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgid, session = fields[0], int(fields[2]), int(fields[3])
        if session == sid and state != "Z":
            members.append((int(entry), pgid))
    return members


@pytest.mark.slow
def test_ctrl_c_leaves_no_process_behind() -> None:
    """Ctrl-C (SIGINT to the foreground process group) during a trial: exit 130, nothing left running."""
    exe = os.path.join(os.path.dirname(sys.executable), "batchpilot")
    proc = subprocess.Popen([exe, "probe", "--model", "tiny-llama-1m", "--seq-len", "512", "--memory-budget",
                             "2GiB", "--device", "cpu", "--precision", "fp32", "--json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # a trial process: own process group inside the session
            if any(pgid == pid != proc.pid for pid, pgid in _session_members(proc.pid)):
                break
            time.sleep(0.2)
        else:
            pytest.fail("no trial process started within 120 s")
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 130
        deadline = time.monotonic() + 15
        while _session_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _session_members(proc.pid) == []
    finally:
        for pid, _ in _session_members(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()


def test_lengths_file_gives_the_worst_case(tmp_path) -> None:
    from batchpilot.cli.probe import _read_lengths

    (tmp_path / "a.txt").write_text("12\n700\n35\n", encoding="utf-8")
    (tmp_path / "b.json").write_text("[12, 70, 35]", encoding="utf-8")
    assert worst_case_seq_len(_read_lengths(tmp_path / "a.txt"), cap=512) == 512
    assert worst_case_seq_len(_read_lengths(tmp_path / "b.json"), cap=512) == 70
    (tmp_path / "c.txt").write_text("12 x", encoding="utf-8")
    with pytest.raises(BatchpilotError, match="must hold integers"):
        _read_lengths(tmp_path / "c.txt")


def test_cuda_without_a_gpu_is_a_one_line_error(cli_runner) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from batchpilot.cli import app

    res = cli_runner.invoke(app, ["probe", "--model", "tiny-llama-1m", "--device", "cuda"])
    assert res.exit_code == 2
    assert "--device cuda" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_an_unknown_calibration_accelerator_fails_before_any_trial():
    from batchpilot.errors import BatchpilotError
    from batchpilot.measure.calibrate import check_calibration_accelerator_for

    with pytest.raises(BatchpilotError, match="bogus"):
        check_calibration_accelerator_for("cuda", "bogus")
    check_calibration_accelerator_for("cuda", "h100-sxm")  # a catalog name passes
    check_calibration_accelerator_for("cpu", None)


def test_a_trial_killed_before_its_limit_names_host_memory():
    """SIGKILL before the trial set its memory limit: the kernel killed it while the model was being built
    (a model too large for the machine), which the message says instead of 'check that torch works'."""

    with pytest.raises(ProbeError, match="killed \\(SIGKILL\\) before its memory limit was set, while building"):
        _to_trial(1, [], -9, 1.0)
    with pytest.raises(ProbeError, match="check that torch works"):
        _to_trial(1, [], 1, 1.0)


def test_the_trials_checkpoint_one_layer_in_n_as_asked() -> None:
    """--recompute full --recompute-every 2 keeps every other layer's activations, so fewer sequences fit than with
    every layer checkpointed (the trial processes used to drop recompute_every and measure every layer
    checkpointed: both probes found the same limit). Real CPU trials under the memory limit."""
    def limit(every: int) -> int:
        settings = RunSettings(precision="fp32", recompute="full", recompute_every=every)
        request = _request(settings=settings, budget_bytes=96 * MIB, knee=False)
        assert trial_spec(request, 4)["recompute_every"] == every
        return run_probe(request).max_micro_batch

    assert limit(2) < limit(1)
