"""``batchpilot noise``: the --json contract and one-line errors."""

from __future__ import annotations

import math

from typer.testing import CliRunner

from batchpilot.cli import app
from batchpilot.records.noise import NoiseRecord
from batchpilot.train.data import stdlib_root

RUNNER = CliRunner()


def test_noise_json_keys_and_values() -> None:
    import json

    args = ["noise", "--data", str(stdlib_root() / "json"), "--seq-len", "32", "--micro-batch", "2",
            "--global-batch", "8", "--steps", "4", "--threads", "1", "--train-tokens", "1B", "--json"]
    result = RUNNER.invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["schema_version"] == NoiseRecord.SCHEMA_VERSION  # what `plan --noise FILE` reads back:
    assert NoiseRecord.from_dict(record).to_dict() == record  # the same object through the record's loader
    for key in ("b_simple_sequences", "b_simple_tokens", "band", "steps_measured", "tradeoff", "priors"):
        assert key in record
    assert record["steps_measured"] == 4 and len(record["trajectory"]) == 4
    b = record["b_simple_sequences"]
    lo, hi = record["band"]["sequences"]
    assert b > 0 and (hi is None or lo <= b <= hi)
    assert math.isclose(record["b_simple_tokens"], b * record["tokens_per_sequence"], rel_tol=1e-9)
    assert "deepseek_b_opt_tokens" in record["priors"] and "kaplan_b_crit_tokens" in record["priors"]
    # every published law side by side for --train-tokens, and a whole-run schedule or the reason there is none
    assert [law["law"] for law in record["priors"]["laws"]] == [
        "deepseek-llm-2024", "step-law-2025", "zhang-cbs-2024", "kaplan-2020"]
    assert math.isclose(record["priors"]["laws"][0]["batch_tokens"], record["priors"]["deepseek_b_opt_tokens"])
    assert ("schedule" in record) != ("schedule_error" in record)
    for row in record["tradeoff"]:  # McCandlish Eq. 2.11 at B_crit = B_simple
        assert math.isclose(row["steps_vs_min"], 1 + b / row["batch_sequences"], rel_tol=1e-9)


def test_noise_rejects_one_batch_size() -> None:
    result = RUNNER.invoke(app, ["noise", "--micro-batch", "4", "--global-batch", "4"])
    assert result.exit_code == 2
    assert "at least 2 × micro" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_noise_can_measure_twice_into_one_out_and_keeps_no_weights(tmp_path) -> None:
    """A measurement run writes no final checkpoint (its weights are not kept), so measuring again into
    the same --out works; the runner's refusal to start fresh over checkpoints is for training runs."""
    out = tmp_path / "noise"
    args = ["noise", "--data", str(stdlib_root() / "json"), "--seq-len", "32", "--micro-batch", "2",
            "--global-batch", "4", "--steps", "2", "--threads", "1", "--out", str(out), "--json"]
    for _ in range(2):
        result = RUNNER.invoke(app, args)
        assert result.exit_code == 0, result.output
    assert not (out / "checkpoints").exists()
    assert (out / "metrics.jsonl").read_text().count("\n") == 2  # the second run's two steps
