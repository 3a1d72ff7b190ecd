"""``batchpilot tune`` end to end on the ~1M preset: every stage's record, the report and its plots.

Real trials (child processes under a real memory limit), a real noise measurement, a real plan and a
real verification run; kept short by a small budget, a short sequence and a short time budget. Records are
read back through their loaders (:mod:`batchpilot.records`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from batchpilot.cli import app
from batchpilot.records.memory_curve import MemoryCurve
from batchpilot.records.noise import NoiseRecord
from batchpilot.records.plan import PlanRecord
from batchpilot.records.probe import ProbeResult
from batchpilot.records.train_summary import TrainSummary
from batchpilot.records.tune_state import TuneOutcome, TuneRunRecord
from batchpilot.records.verify import VerifyRecord
from batchpilot.tune.config import STAGES

pytestmark = pytest.mark.slow
CLUSTER = ("--gpu", "h100-sxm", "--gpus", "16")
"""The target cluster of every run here (``--reuse`` refuses a plan made for another cluster, or for none)."""


@pytest.fixture(scope="module")
def tune_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tune") / "run"
    cmd = [sys.executable, "-m", "batchpilot.cli", "tune", "--model", "tiny-llama-1m", "--seq-len", "64",
           "--memory-budget", "96MiB", "--time-budget", "60s", "--device", "cpu", "--out", str(out), "--json",
           *CLUSTER]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads(done.stdout)


def test_every_stage_ran_and_wrote_its_record(tune_run: tuple[Path, dict]) -> None:
    out, summary = tune_run
    assert summary["schema_version"] == TuneOutcome.SCHEMA_VERSION
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == list(STAGES)
    assert all(s["status"] == "ok" for s in stages.values()), stages
    for name, stage in stages.items():
        assert (out / stage["record"]).is_file(), name
    assert [s.name for s in TuneRunRecord.load(out / "tune.json").stages] == list(STAGES)


def test_records_are_consistent(tune_run: tuple[Path, dict]) -> None:
    """Every record read back through its loader (a version or shape its writer did not write would fail here)."""
    out, summary = tune_run
    probe = ProbeResult.load(out / "probe.json")
    fitting = [t.micro_batch for t in probe.trials if t.fits]
    assert probe.max_micro_batch == max(fitting)
    assert all(t.micro_batch > probe.max_micro_batch for t in probe.trials if not t.fits)
    assert probe.knee_micro_batch in fitting
    assert probe.calibration is not None and probe.peak_flops_per_s  # tune's local calibration
    curve = MemoryCurve.load(out / "memory_curve.json")
    assert list(curve.micro_batches) == sorted({t.micro_batch for t in probe.trials})
    noise = NoiseRecord.load(out / "noise.json")
    assert noise.steps_measured >= 4 and noise.micro_batch_sequences == probe.knee_micro_batch
    plan = PlanRecord.load(out / "plan.json")
    best = plan.best
    assert best is not None and best.micro_batch == probe.knee_micro_batch
    assert best.micro_batch * best.grad_accum * best.dp == best.global_batch_sequences
    cluster = plan.cluster_plan
    assert cluster is not None and cluster.plans, "a plan for the 16 × H100 target"
    assert cluster.target_source  # B_simple of a fresh tiny model is below 16 sequences: the floor applies
    if cluster.target_source.startswith("one sequence per GPU"):
        assert all(p.global_batch_sequences >= 16 * 0.75 for p in cluster.plans)  # max_deviation 0.25
    metrics = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["global_batch_sequences"] == best.global_batch_sequences for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"], "the verification run learns"
    verify = VerifyRecord.load(out / "verify.json")
    assert verify.summary == TrainSummary.load(out / "train" / "summary.json")
    assert verify.predicted.tokens_per_s == best.tokens_per_s and verify.steps == verify.summary.steps
    assert summary["plan"] == best.to_dict()
    assert any(p.name.startswith("cluster-deepspeed") for p in (out / "exports").iterdir())


def test_report_has_every_plot(tune_run: tuple[Path, dict]) -> None:
    out, _ = tune_run
    page = (out / "report.html").read_text()
    for name in ("memory", "throughput", "noise", "loss"):
        assert f"id='plot-{name}'" in page and (out / "plots" / f"{name}.png").is_file()


def test_reuse_skips_measuring_again(tune_run: tuple[Path, dict], cli_runner) -> None:
    out, _ = tune_run
    result = cli_runner.invoke(app, ["tune", "--out", str(out), "--reuse", "--skip", "verify", "--json",
                                     "--time-budget", "60s", "--device", "cpu", "--seq-len", "64", *CLUSTER])
    assert result.exit_code == 0, result.stderr
    stages = {s["name"]: s["status"] for s in json.loads(result.stdout)["stages"]}
    assert stages == {"probe": "reused", "memory": "reused", "noise": "reused", "plan": "reused",
                      "verify": "skipped", "report": "ok"}


def test_reuse_refuses_records_made_for_another_sequence_length(tune_run: tuple[Path, dict], cli_runner) -> None:
    out, _ = tune_run
    result = cli_runner.invoke(app, ["tune", "--out", str(out), "--reuse", "--skip", "verify", "--json",
                                     "--time-budget", "60s", "--device", "cpu", "--seq-len", "128"])
    assert result.exit_code == 2 and "seq_len 64 (now 128)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_running_again_into_the_same_out_replaces_the_stage_runs(tune_run: tuple[Path, dict]) -> None:
    """A second ``tune`` without --reuse re-runs every stage: its own training folders (``noise-run``,
    ``train``) are emptied first, so the runner's refusal to start fresh over checkpoints does not fire.
    Probe, memory and plan are reused here to keep the test short; noise and verify run again."""
    out, _ = tune_run
    before = (out / "train" / "metrics.jsonl").stat().st_mtime_ns
    cmd = [sys.executable, "-m", "batchpilot.cli", "tune", "--model", "tiny-llama-1m", "--seq-len", "64",
           "--memory-budget", "96MiB", "--time-budget", "30s", "--device", "cpu", "--out", str(out), "--json",
           *CLUSTER]
    for stage in ("noise", "verify"):
        (out / f"{stage}.json").unlink()  # no record: --reuse runs the stage again
    done = subprocess.run([*cmd, "--reuse"], capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    stages = {s["name"]: s["status"] for s in json.loads(done.stdout)["stages"]}
    assert stages["noise"] == "ok" and stages["verify"] == "ok", stages
    assert (out / "train" / "metrics.jsonl").stat().st_mtime_ns != before
