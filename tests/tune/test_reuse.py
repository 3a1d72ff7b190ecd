"""``tune --reuse``: records read through their loaders, typed into the state; a record made for another model,
sequence length, device, data, settings or probe budget is refused in one line before anything runs.

The run folders are written by the records' writers (``record_samples``: tiny-llama-1m, seq 64, fp32 on CPU,
budget 900 MiB), so these tests run no trial and no training step.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import record_samples

from batchpilot.cli import app
from batchpilot.estimate.calibration import Calibration, EfficiencyPoint
from batchpilot.records.base import RecordError
from batchpilot.records.plan import PlanRecord
from batchpilot.records.tune_state import TuneRunRecord
from batchpilot.tune.config import TuneConfig
from batchpilot.tune.pipeline import run_tune
from batchpilot.tune.reuse import ReuseError

FILES = {"probe.json": record_samples.probe, "memory_curve.json": record_samples.memory_curve,
         "noise.json": record_samples.noise, "plan.json": record_samples.plan}


def _folder(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    out.mkdir()
    for name, sample in FILES.items():
        sample().save(out / name)
    return out


def _config(out: Path, **changes: object) -> TuneConfig:
    base: dict[str, object] = dict(model=record_samples.MODEL, seq_len=record_samples.SEQ, device="cpu", out=out,
                                   reuse=True, skip=("verify", "report"), memory_budget_bytes=900 * record_samples.MIB)
    base.update(changes)
    return TuneConfig(**base)  # type: ignore[arg-type]


def test_matching_records_are_reused_typed(tmp_path: Path) -> None:
    out = _folder(tmp_path)
    result = run_tune(_config(out))
    assert [(s.name, s.status) for s in result.stages] == [
        ("probe", "reused"), ("memory", "reused"), ("noise", "reused"), ("plan", "reused"), ("verify", "skipped"),
        ("report", "skipped")]
    assert result.state.probe == record_samples.probe() and result.state.plan == record_samples.plan()
    assert result.state.noise == record_samples.noise() and result.state.memory == record_samples.memory_curve()
    record = result.to_dict()
    assert record["schema_version"] == 1 and record["plan"] == record_samples.plan_row().to_dict()
    assert (record["max_micro_batch"], record["knee_micro_batch"], record["b_simple_sequences"]) == (24, 24, 21.5)
    assert TuneRunRecord.load(out / "tune.json").stages == result.stages


def test_without_a_budget_the_probe_records_budget_and_calibration_are_taken(tmp_path: Path) -> None:
    """No --memory-budget: the reused probe's budget is the run's, and its embedded calibration is the local
    device's; the plan stage (run again here) plans on budget + weights with that calibration."""
    out = _folder(tmp_path)
    calibration = Calibration(points=(EfficiencyPoint(tokens_per_micro_batch=24 * 64, efficiency=0.25),),
                              accelerator="cpu", model=record_samples.MODEL, seq_len=64, source="sample probe")
    record_samples.probe(calibration=calibration.to_dict(), peak_flops_per_s=2e11).save(out / "probe.json")
    (out / "plan.json").unlink()
    result = run_tune(_config(out, memory_budget_bytes=None))
    assert [s.status for s in result.stages[:4]] == ["reused", "reused", "reused", "ok"], result.stages
    assert result.state.request is not None and result.state.request.budget_bytes == 900 * record_samples.MIB
    assert result.state.calibration == calibration and result.state.peak_flops_per_s == 2e11
    plan = PlanRecord.load(out / "plan.json")
    assert plan.calibration == "sample probe" and plan.target_source == "noise (B_simple)"
    assert plan.best is not None and plan.best.micro_batch == 24  # the knee, pinned
    assert plan.budget_bytes > 900 * record_samples.MIB  # the weights on top of the probe's budget


@pytest.mark.parametrize(("changes", "found"), [
    ({"seq_len": 128}, "seq_len 64 (now 128)"),
    ({"model": "tiny-llama-15m"}, "model 'tiny-llama-1m' (now 'tiny-llama-15m')"),
    ({"memory_budget_bytes": 2**30}, "budget_bytes 943718400 (now 1073741824)"),
])
def test_a_probe_made_for_another_run_is_refused_in_one_line(tmp_path: Path, changes, found) -> None:
    out = _folder(tmp_path)
    with pytest.raises(ReuseError) as info:
        run_tune(_config(out, **changes))
    message = str(info.value)
    assert "\n" not in message and str(out / "probe.json") in message and found in message
    assert "drop --reuse (or delete probe.json) to run the probe stage again" in message


def test_each_stage_checks_its_own_record(tmp_path: Path) -> None:
    out = _folder(tmp_path)
    record_samples.noise(data="corpus.jsonl").save(out / "noise.json")
    with pytest.raises(ReuseError, match=r"noise\.json' was made for data 'corpus\.jsonl' \(now 'stdlib'\)"):
        run_tune(_config(out))
    record_samples.noise().save(out / "noise.json")
    record_samples.plan(settings=replace(record_samples.SETTINGS, precision="bf16")).save(out / "plan.json")
    with pytest.raises(ReuseError, match=r"plan\.json' was made for precision 'bf16' \(now 'fp32'\); drop --reuse"):
        run_tune(_config(out))


def test_a_plan_without_the_asked_cluster_plan_is_refused(tmp_path: Path) -> None:
    """--gpu h100-sxm --gpus 64 with a plan.json made without a target cluster (or for another one): refused,
    not reused without the cluster plan the run asked for."""
    out = _folder(tmp_path)
    with pytest.raises(ReuseError, match=r"plan\.json' was made for cluster None \(now 'h100-sxm × 64 \(8 per "
                                         r"node\)'\); drop --reuse \(or delete plan\.json\)"):
        run_tune(_config(out, gpu="h100-sxm", gpus=64))
    cluster = {"accelerator": "h100-sxm", "devices_per_node": 8, "num_nodes": 8, "total_devices": 64}
    record_samples.plan(cluster_plan=record_samples.plan(cluster=cluster)).save(out / "plan.json")
    assert run_tune(_config(out, gpu="h100-sxm", gpus=64)).stages[3].status == "reused"
    with pytest.raises(ReuseError, match=r"cluster 'h100-sxm × 64 \(8 per node\)' \(now 'h100-sxm × 16 \(8 per node\)'\)"):
        run_tune(_config(out, gpu="h100-sxm", gpus=16))
    with pytest.raises(ReuseError, match=r"cluster 'h100-sxm × 64 \(8 per node\)' \(now None\)"):
        run_tune(_config(out))


def test_a_record_of_another_version_is_refused_in_one_line(tmp_path: Path) -> None:
    out = _folder(tmp_path)
    data = json.loads((out / "memory_curve.json").read_text())
    data["schema_version"] = 7
    (out / "memory_curve.json").write_text(json.dumps(data))
    with pytest.raises(RecordError, match=r"memory_curve\.json' has schema_version 7; this batchpilot reads only "
                                          r"schema_version 1; run the memory stage again"):
        run_tune(_config(out))


def test_the_cli_refuses_a_mismatch_in_one_line(cli_runner, tmp_path: Path) -> None:
    out = _folder(tmp_path)
    result = cli_runner.invoke(app, ["tune", "--out", str(out), "--reuse", "--skip", "verify,report", "--device", "cpu",
                                     "--seq-len", "128", "--json"])
    assert result.exit_code == 2, result.output
    assert "seq_len 64 (now 128)" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_a_verification_run_for_another_sequence_length_is_refused(tmp_path: Path) -> None:
    out = _folder(tmp_path)
    verify = record_samples.verify()
    other = replace(verify.summary, config={**verify.summary.config, "data": {"data": "stdlib", "seq_len": 32}})
    replace(verify, summary=other).save(out / "verify.json")
    with pytest.raises(ReuseError, match=r"verify\.json' was made for seq_len 32 \(now 64\)"):
        run_tune(_config(out, skip=("report",)))
    replace(verify, summary=replace(other, config={})).save(out / "verify.json")  # a config without the keys
    with pytest.raises(ReuseError, match=r"was made for model None \(now 'tiny-llama-1m'\)"):
        run_tune(_config(out, skip=("report",)))
