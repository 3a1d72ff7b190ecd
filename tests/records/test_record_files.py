"""Every record: writer → loader gives the same value; a missing or unknown schema version, and a value of the
wrong type, are refused in one line that names the file, what it found and what to run again."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import record_samples as samples

from batchpilot.errors import BatchpilotError
from batchpilot.records.base import RecordError
from batchpilot.records.noise import NoiseBand, NoiseRecord
from batchpilot.records.train_summary import TrainNoiseScale, TrainSummary

NAMES = sorted(samples.SAMPLES)


@pytest.mark.parametrize("name", NAMES)
def test_writer_then_loader_gives_the_same_record(name: str, tmp_path: Path) -> None:
    record = samples.SAMPLES[name]()
    cls = type(record)
    assert cls.from_dict(record.to_dict()) == record
    path = record.save(tmp_path / f"{name}.json")
    assert cls.load(path) == record
    text = path.read_text(encoding="utf-8")
    assert next(iter(json.loads(text))) == "schema_version"  # first key: visible at the top of the file
    assert json.loads(text)["schema_version"] == cls.SCHEMA_VERSION
    assert not list(tmp_path.glob(".*.tmp*"))  # the atomic writer's temporary file is gone


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("version", [None, 0, 99, "1", True, 1.0])
def test_a_missing_or_unknown_version_is_refused_in_one_line(name: str, version: object, tmp_path: Path) -> None:
    record = samples.SAMPLES[name]()
    data = record.to_dict()
    if version is None:
        del data["schema_version"]
    else:
        data["schema_version"] = version
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(RecordError) as info:
        type(record).load(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert f"reads only schema_version {type(record).SCHEMA_VERSION}" in message
    assert ("no schema_version" if version is None else f"schema_version {json.dumps(version)}") in message
    assert "again" in message  # what to do: run the stage again


@pytest.mark.parametrize(("name", "change", "expected"), [
    ("probe", lambda d: d["trials"][1].update(micro_batch="8"), "trials[1].micro_batch must be an integer, got \"8\""),
    ("probe", lambda d: d["trials"][0].update(micro_batch=4.0), "trials[0].micro_batch must be an integer, got 4.0"),
    ("probe", lambda d: d.update(max_micro_batch=True), "max_micro_batch must be an integer, got true"),
    ("probe", lambda d: d.update(device="tpu"), "device must be one of 'cpu', 'cuda', got \"tpu\""),
    ("probe", lambda d: d.pop("trials"), "trials is missing"),
    ("probe", lambda d: d["settings"].update(precision="fp64"), "settings.precision must be one of 'fp32'"),
    ("probe", lambda d: d["settings"].update(vpp=2), "settings is not valid (--vpp 2 interleaves pipeline stages"),
    ("memory_curve", lambda d: d.update(traced=5), "traced must be a list, got 5"),
    ("noise", lambda d: d["band"].update(sequences=[1.0]), "band.sequences must hold 2 values, got 1"),
    ("noise", lambda d: d.update(trajectory=[{"step": 1, "b_simple_sequences": 3.0}]), "trajectory[0].loss is missing"),
    ("plan", lambda d: d["plans"][0]["memory"].update(total="1GiB"), "plans[0].memory.total must be an integer"),
    ("plan", lambda d: d.update(plans=3), "plans must be a list, got 3"),
    ("summary", lambda d: d["noise_scale"].pop("note"), "noise_scale.note is missing"),
    ("verify", lambda d: d["summary"].update(steps=[1]), "summary.steps must be an integer, got a list"),
    ("tune", lambda d: d["stages"][0].update(status="done"), "stages[0].status must be one of 'ok', 'skipped'"),
])
def test_a_value_of_the_wrong_type_is_refused_in_one_line(name, change, expected, tmp_path: Path) -> None:
    record = samples.SAMPLES[name]()
    data = record.to_dict()
    change(data)
    path = tmp_path / "record.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(BatchpilotError) as info:
        type(record).load(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and expected in message, message


@pytest.mark.parametrize("text", ["[1, 2]", "{", '{"schema_version": 1, "steps_measured": NaN}', ""])
def test_a_file_that_is_not_a_json_object_is_refused_in_one_line(text: str, tmp_path: Path) -> None:
    path = tmp_path / "noise.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(BatchpilotError) as info:
        NoiseRecord.load(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_infinity_is_written_as_null_and_read_back() -> None:
    """JSON has no infinity: a noise-dominated B_simple (∞) and an unbounded band are null in the file."""
    inf = math.inf
    record = samples.noise(b_simple_sequences=inf, b_simple_tokens=inf, b_crit_sequences=inf, b_crit_tokens=inf,
                           band=NoiseBand(sequences=(0.0, inf), tokens=(0.0, inf), level=0.95, ratio=inf), tradeoff=())
    data = json.loads(json.dumps(record.to_dict(), allow_nan=False))
    assert data["b_simple_sequences"] is None and data["band"]["sequences"] == [0.0, None]
    assert NoiseRecord.from_dict(data) == record


def test_producer_extras_are_absent_until_set() -> None:
    """Keys one producer adds (plan --json's warnings, tune's cluster plan, probe's tune calibration) are left out
    while unset, so each command's --json keeps its own keys."""
    plan = samples.plan(target_source=None)
    assert not {"warnings", "export", "target_source", "cluster_plan"} & set(plan.to_dict())
    assert not {"source", "prior", "noise"} & set(plan.to_dict()["target"])
    nested = samples.plan(cluster_plan=samples.plan(target_source="prior"), warnings=("w",))
    data = nested.to_dict()
    assert data["cluster_plan"]["target_source"] == "prior" and data["warnings"] == ["w"]
    assert type(nested).from_dict(data) == nested
    probe = samples.probe().to_dict()
    assert probe["calibration_file"] is None and not {"calibration", "peak_flops_per_s"} & set(probe)


@pytest.mark.parametrize("scale", [
    TrainNoiseScale(every=0, note="off (--noise-every 0 / --no-noise)"),
    TrainNoiseScale(every=4, note="measured on one step in 4"),
    samples.summary().noise_scale,
])
def test_the_summary_noise_scale_keeps_its_three_shapes(scale: TrainNoiseScale) -> None:
    data = scale.to_dict()
    assert list(data)[:2] == ["every", "note"]
    if scale.estimate is None:
        assert data == {"every": scale.every, "note": scale.note, **({"steps_measured": 0} if scale.every else {})}
    else:
        assert data["steps_measured"] == scale.estimate.steps_measured and data["band"]["level"] == 0.95
    summary = samples.summary(noise_scale=scale)
    assert TrainSummary.from_dict(summary.to_dict()) == summary


def test_unknown_keys_are_ignored_and_defaults_fill_absent_optional_keys() -> None:
    data = samples.probe().to_dict()
    data["added_by_a_script"] = 1
    del data["calibration_file"]
    assert type(samples.probe()).from_dict(data) == replace(samples.probe(), calibration_file=None)
