"""``batchpilot plan`` CLI contract: JSON keys, exports, calibration, exit code 2 with one-line errors."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import record_samples

from batchpilot.cli import app
from batchpilot.estimate.calibration import Calibration, EfficiencyPoint, save_calibration
from batchpilot.records.plan import PlanRecord

BASE = ["plan", "--model", "tiny-llama-15m", "--gpu", "h100-sxm", "--gpus", "16", "--seq-len", "1024"]
PLAN_KEYS = {"micro_batch", "grad_accum", "dp", "tp", "pp", "ep", "zero_stage", "recompute",
             "global_batch_sequences", "global_batch_tokens", "memory", "flops_per_step", "step_time_s",
             "tokens_per_s", "tflops_per_gpu", "mfu"}
MEMORY_KEYS = {"weights", "gradients", "optimizer", "activations", "overhead", "total"}


def _json(cli_runner, *args: str) -> dict:
    result = cli_runner.invoke(app, [*BASE, *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_json_contract(cli_runner):
    record = _json(cli_runner, "--global-batch", "64", "--top", "3", "--engine", "deepspeed")
    assert len(record["plans"]) == 3
    assert record["schema_version"] == PlanRecord.SCHEMA_VERSION
    assert PlanRecord.from_dict(record).to_dict() == record  # the plan record's loader reads what --json prints
    for plan in record["plans"]:
        assert set(plan) >= PLAN_KEYS
        assert set(plan["memory"]) == MEMORY_KEYS
        assert plan["micro_batch"] * plan["grad_accum"] * plan["dp"] == plan["global_batch_sequences"] == 64
        assert plan["global_batch_tokens"] == 64 * 1024
        assert plan["dp"] * plan["tp"] * plan["pp"] == 16
        assert plan["memory"]["total"] == sum(plan["memory"][k] for k in MEMORY_KEYS - {"total"})
    assert [p["tokens_per_s"] for p in record["plans"]] == sorted((p["tokens_per_s"] for p in record["plans"]),
                                                                   reverse=True)
    assert isinstance(record["rejected"], list) and record["rationale"].startswith("tp ")


def test_tokens_target_with_binary_suffix(cli_runner):
    record = _json(cli_runner, "--global-batch-tokens", "64Ki", "--max-deviation", "0")
    assert record["target"]["global_batch_sequences"] == 64
    assert all(p["global_batch_tokens"] == 64 * 1024 for p in record["plans"])


def test_rejections_carry_reasons(cli_runner):
    result = cli_runner.invoke(app, ["plan", "--model", "llama-2-7b", "--gpu", "a100-40gb", "--gpus", "16",
                                     "--seq-len", "4096", "--global-batch", "256", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    memory = [r for r in record["rejected"] if r["kind"] == "memory"]
    assert memory and all("GiB" in r["reason"] and "usable" in r["reason"] for r in memory)
    assert record["rejected_total"] >= len(record["rejected"])


def test_like_uses_the_registry(cli_runner):
    record = _json(cli_runner, "--like", "llama-2-7b", "--max-deviation", "5%")
    assert record["target"]["global_batch_tokens"] == pytest.approx(4 * 2**20, rel=0.01)
    assert "llama" in record["target"]["source"].lower()


def test_train_tokens_uses_the_deepseek_prior(cli_runner):
    from batchpilot.plan.priors import global_batch_from_prior

    record = _json(cli_runner, "--train-tokens", "1B")
    prior = global_batch_from_prior(num_layers=6, hidden_size=384, seq_len=1024, train_tokens=1e9)
    assert record["target"]["prior"]["batch_sequences"] == prior.batch_sequences
    assert record["target"]["max_deviation"] == 0.1  # soft target: 10 % unless --max-deviation
    for plan in record["plans"]:
        assert abs(plan["global_batch_sequences"] - prior.batch_sequences) <= 0.1 * prior.batch_sequences


def test_noise_file_sets_the_target_and_warns_on_other_seq_len(cli_runner, tmp_path):
    path = record_samples.noise(b_simple_sequences=96.4, b_simple_tokens=96.4 * 2048, steps_measured=40,
                                seq_len=2048).save(tmp_path / "noise.json")
    result = cli_runner.invoke(app, [*BASE, "--noise", str(path), "--max-deviation", "0", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["target"]["global_batch_sequences"] == 96
    assert all(p["global_batch_sequences"] == 96 for p in record["plans"])
    assert "seq 2048" in record["warnings"][0] and "warning:" in result.stderr


def test_pins_and_calibration(cli_runner, tmp_path):
    cal = Calibration(points=(EfficiencyPoint(tokens_per_micro_batch=1024, efficiency=0.2),),
                      memory_overhead_bytes=2**30, accelerator="h100-sxm", source="test probe")
    path = save_calibration(cal, tmp_path / "cal.json")
    record = _json(cli_runner, "--global-batch", "64", "--tp", "2", "--micro-batch", "2", "--zero", "1",
                   "--recompute", "full", "--calibration", str(path), "--engine", "megatron")
    assert record["calibration"] == "test probe" and not [w for w in record["warnings"] if "calibration" in w]
    for plan in record["plans"]:
        assert (plan["tp"], plan["micro_batch"], plan["zero_stage"], plan["recompute"]) == (2, 2, 1, "full")
        assert plan["step"]["efficiency"] == 0.2


@pytest.mark.parametrize("fmt", ["deepspeed", "lightning"])  # hf: tests/plan/test_export.py
def test_export_to_file(cli_runner, tmp_path, fmt):
    out = tmp_path / f"{fmt}.json"
    result = cli_runner.invoke(app, [*BASE, "--global-batch", "64", "--engine", "deepspeed", "--tp", "1",
                                     "--pp", "1", "--export", fmt, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())
    assert f"exported the winner as {fmt}" in result.stdout


def test_export_to_stdout(cli_runner):
    result = cli_runner.invoke(app, [*BASE, "--global-batch", "64", "--engine", "batchpilot", "--export", "torchrun"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("torchrun --nnodes 2 --nproc-per-node 8")


def test_table_output(cli_runner):
    result = cli_runner.invoke(app, [*BASE, "--global-batch", "64"])
    assert result.exit_code == 0, result.output
    assert "winner:" in result.stdout and "tokens/s" in result.stdout and "MFU" in result.stdout


@pytest.mark.parametrize(("args", "fragments"), [
    (["--global-batch", "64", "--tp", "4"], ["--tp 4", "6 attention heads", "divisor of 6"]),
    (["--global-batch", "64", "--pp", "8"], ["--pp 8", "6 layers", "--pp ≤ 6"]),
    (["--global-batch", "-64"], ["--global-batch", "-64"]),
    (["--global-batch", "64", "--micro-batch", "0"], ["--micro-batch '0'", "positive"]),
    (["--global-batch", "7", "--tp", "1", "--pp", "1"], ["global batch 7", "use --global-batch 16"]),  # 16 is +129%:
    # beyond any --max-deviation, so none is advised
    (["--global-batch-tokens", "1000"], ["1000 tokens", "1024-token", "--max-deviation"]),
    (["--global-batch", "64", "--global-batch-tokens", "64Ki"], ["exactly one", "--global-batch-tokens"]),
    (["--seq-len", "0", "--global-batch", "64"], ["--seq-len '0'"]),
    (["--global-batch", "64", "--headroom", "150%"], ["--headroom", "150%"]),
    (["--global-batch", "64", "--export", "yaml"], ["--export 'yaml'", "deepspeed"]),
    (["--global-batch", "64", "--gpus-per-node", "5"], ["--gpus 16", "--gpus-per-node 5"]),
    (["--global-batch", "64", "--calibration", "/nonexistent.json"], ["/nonexistent.json", "batchpilot probe"]),
    (["--global-batch", "64", "--like", "gpt-3-175b"], ["exactly one"]),
])
def test_bad_input_is_one_line_exit_2(cli_runner, args, fragments):
    result = cli_runner.invoke(app, [*BASE, *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def _calibration_file(tmp_path, accelerator: str) -> str:
    cal = Calibration(points=(EfficiencyPoint(tokens_per_micro_batch=1024, efficiency=0.2),),
                      accelerator=accelerator, source="test probe")
    return str(save_calibration(cal, tmp_path / "cal.json"))


@pytest.mark.parametrize(("recorded", "fragments"), [
    ("a100-80gb", ["measured on a100-80gb, not on --gpu h100-sxm", "plan with --gpu a100-80gb",
                   "batchpilot probe --device cuda --gpu h100-sxm"]),
    ("cpu", ["this machine's CPU", "--gpu h100-sxm", "batchpilot probe --device cuda --gpu h100-sxm",
             "drop --calibration"]),
])
def test_calibration_from_another_accelerator_is_refused(cli_runner, tmp_path, recorded, fragments):
    path = _calibration_file(tmp_path, recorded)
    result = cli_runner.invoke(app, [*BASE, "--global-batch", "64", "--calibration", path, "--json"])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: calibration file {path!r}")
    for fragment in fragments:
        assert fragment in lines[0]


def test_calibration_names_match_case_insensitively_or_as_the_same_file(cli_runner, tmp_path):
    assert _json(cli_runner, "--global-batch", "64", "--calibration",
                 _calibration_file(tmp_path, "H100-SXM"))["warnings"] == []
    gpu = tmp_path / "my-gpu.json"
    gpu.write_bytes((resources.files("batchpilot") / "data" / "accelerators" / "h100-sxm.json").read_bytes())
    path = _calibration_file(tmp_path, str(gpu))
    args = ["plan", "--model", "tiny-llama-15m", "--gpus", "16", "--seq-len", "1024", "--global-batch", "64",
            "--calibration", path, "--json"]
    same = cli_runner.invoke(app, [*args, "--gpu", str(tmp_path / "." / "my-gpu.json")])
    assert same.exit_code == 0, same.output
    other = cli_runner.invoke(app, [*args, "--gpu", "h100-sxm"])
    assert other.exit_code == 2 and f"measured on {gpu}, not on --gpu h100-sxm" in other.stderr


def test_calibration_without_an_accelerator_is_used_with_one_warning_line(cli_runner, tmp_path):
    path = _calibration_file(tmp_path, "")
    result = cli_runner.invoke(app, [*BASE, "--global-batch", "64", "--calibration", path, "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["calibration"] == "test probe"
    assert all(p["step"]["efficiency"] == 0.2 for p in record["plans"])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: calibration file {path!r} records no accelerator")
    assert '"accelerator": "h100-sxm"' in lines[0] and record["warnings"] == [lines[0].removeprefix("warning: ")]


def test_nothing_fits_exit_2(cli_runner):
    result = cli_runner.invoke(app, ["plan", "--model", "llama-3-70b", "--gpu", "rtx-4090", "--gpus", "8",
                                     "--seq-len", "4096", "--global-batch", "64", "--engine", "deepspeed"])
    assert result.exit_code == 2
    assert "nothing fits" in result.stderr and "fits with: " in result.stderr
