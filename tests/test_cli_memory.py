"""``batchpilot memory``: the --json contract, the shared settings flags and one-line errors (exit 2)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from batchpilot.cli import app
from batchpilot.cli._settings import DEFAULTS, settings_from_options
from batchpilot.estimate.memory import analytic_memory
from batchpilot.specs.hardware import load_accelerator
from batchpilot.specs.model import load_model
from batchpilot.specs.settings import RunSettings

BASE = ["memory", "--model", "tiny-llama-1m", "--gpu", "h100-sxm", "--seq-len", "128", "--micro-batch", "2"]


def _json(cli_runner: Any, *extra: str) -> dict[str, Any]:
    result = cli_runner.invoke(app, [*BASE, *extra, "--json"])
    assert result.exit_code == 0, result.output
    record: dict[str, Any] = json.loads(result.stdout)
    return record


def test_json_contract(cli_runner: Any) -> None:
    record = _json(cli_runner)
    assert set(record) >= {"model", "method", "settings", "gpu", "memory", "fits", "headroom_bytes", "dp"}
    assert set(record["memory"]) >= {"weights", "gradients", "optimizer", "activations", "overhead", "total"}
    gpu_bytes = load_accelerator("h100-sxm").memory_bytes
    assert record["gpu"] == {"name": "h100-sxm", "memory_bytes": gpu_bytes}
    assert record["headroom_bytes"] == gpu_bytes - record["memory"]["total"]
    assert record["fits"] is True
    assert record["peak_phase"] in ("backward start", "backward end", "optimizer step", "backward of a layer")
    # reserved (what frameworks log) vs allocated; total = reserved + CUDA context + NCCL, what must fit
    details = record["memory"]["details"]
    assert record["reserved_bytes"] == details["reserved_bytes"] >= record["allocated_bytes"]
    assert record["memory"]["total"] == details["reserved_bytes"] + details["outside_allocator_bytes"]
    expected = analytic_memory(load_model("tiny-llama-1m"), RunSettings(), micro_batch=2, seq_len=128)
    assert record["memory"]["total"] == expected.total_bytes


def test_every_settings_flag_reaches_the_settings(cli_runner: Any) -> None:
    record = _json(cli_runner, "--precision", "fp16", "--optimizer", "sgd-momentum", "--engine", "deepspeed",
                   "--zero", "2", "--tp", "2", "--pp", "2", "--vpp", "2", "--sp", "--recompute", "selective",
                   "--attention", "eager", "--offload", "--hybrid-shard", "--gpus", "16", "--grad-accum", "4")
    assert record["settings"] == {  # the flags given; every other setting at its default
        **json.loads(json.dumps(RunSettings().to_dict())),
        "precision": "fp16", "optimizer": "sgd-momentum", "engine": "deepspeed", "zero_stage": 2,
        "hybrid_shard": True, "tp": 2, "pp": 2, "vpp": 2, "ep": 1, "sp": True, "recompute": "selective",
        "attention": "eager", "offload": True,
    }
    assert record["dp"] == 4 and record["grad_accum"] == 4
    assert record["memory"]["optimizer"] == 0  # offloaded


def test_memory_settings_flags_reach_the_settings(cli_runner: Any) -> None:
    record = _json(cli_runner, "--engine", "fsdp2", "--zero", "3", "--precision", "fp8", "--fp8-recipe", "tensorwise",
                   "--fp8-all-gather", "--recompute", "op", "--recompute-every", "2", "--cp", "2", "--compile",
                   "--reshard-after-forward", "last", "--loss", "chunked", "--loss-chunks", "4", "--gpus", "4")
    assert record["settings"] == {
        **json.loads(json.dumps(RunSettings().to_dict())), "engine": "fsdp2", "zero_stage": 3, "precision": "fp8", "fp8_recipe": "tensorwise",
        "fp8_all_gather": True, "recompute": "op", "recompute_every": 2, "cp": 2, "compile": True,
        "reshard_after_forward": "last", "loss": "chunked", "loss_chunks": 4,
    }
    assert record["dp"] == 2  # 4 GPUs / cp 2
    pure = _json(cli_runner, "--param-dtype", "bf16")
    assert pure["settings"]["param_dtype"] == "bf16"


@pytest.mark.parametrize(("flags", "needle"), [
    (["--recompute-every", "2"], "--recompute-every 2 checkpoints 1 layer in 2 and needs --recompute"),
    (["--fp8-recipe", "mxfp8"], "--fp8-recipe mxfp8 needs --precision fp8"),
    (["--loss", "fancy"], "--loss"),
    (["--cp", "3"], "--seq-len 128 must be a multiple of --cp 3"),
])
def test_memory_settings_errors_are_one_line(cli_runner: Any, flags: list[str], needle: str) -> None:
    result = cli_runner.invoke(app, [*BASE, *flags, "--gpus", "3" if "--cp" in flags else "1"])
    assert result.exit_code == 2
    assert needle in result.output and result.output.count("\n") <= 1


def test_ep_flag(cli_runner: Any) -> None:
    record = _json(cli_runner, "--ep", "1")
    assert record["settings"]["ep"] == 1


def test_defaults_match_run_settings() -> None:
    assert settings_from_options() == DEFAULTS == RunSettings()


def test_large_model_does_not_fit(cli_runner: Any) -> None:
    result = cli_runner.invoke(app, ["memory", "--model", "llama-3-70b", "--gpu", "h100-sxm", "--seq-len", "4096",
                                     "--micro-batch", "1", "--json"])
    assert result.exit_code == 0
    record = json.loads(result.stdout)
    assert record["fits"] is False and record["headroom_bytes"] < 0


def test_table_output_labels_gib(cli_runner: Any) -> None:
    result = cli_runner.invoke(app, BASE)
    assert result.exit_code == 0
    assert "GiB" in result.stdout and "activations" in result.stdout and "fits" in result.stdout


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--tp", "3"], "--tp 3 does not divide the 4 attention heads"),
        (["--pp", "9"], "--pp 9 exceeds the 4 layers"),
        (["--micro-batch", "-1"], "--micro-batch '-1' is not a number"),
        (["--seq-len", "0"], "--seq-len '0' must be a positive whole number"),
        (["--precision", "fp64"], "--precision 'fp64' is not one of"),
        (["--zero", "4"], "--zero 4 is not a ZeRO stage"),
        (["--gpus", "3", "--tp", "2"], "--gpus 3 is not a multiple of tp 2"),
        (["--method", "magic"], "--method 'magic' is not one of: analytic, traced"),
        (["--ep", "2"], "--ep 2 needs a mixture-of-experts model"),
    ],
)
def test_bad_input_is_one_line_exit_2(cli_runner: Any, extra: list[str], needle: str) -> None:
    args = list(BASE)
    for i in range(0, len(extra), 2):  # replace a flag already in BASE, else append
        if extra[i] in args:
            args[args.index(extra[i]) + 1] = extra[i + 1]
        else:
            args += extra[i:i + 2]
    result = cli_runner.invoke(app, args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr


def test_unknown_gpu_is_one_line(cli_runner: Any) -> None:
    args = list(BASE)
    args[args.index("--gpu") + 1] = "h100-typo"
    result = cli_runner.invoke(app, args)
    assert result.exit_code == 2 and "unknown accelerator 'h100-typo'" in result.stderr


@pytest.mark.slow
def test_method_traced_reaches_the_traced_estimate(cli_runner: Any) -> None:
    """``--method traced`` runs the fake-tensor trace (CUDA terms added) and keeps the JSON contract."""
    record = _json(cli_runner, "--method", "traced", "--precision", "fp32")
    assert record["method"] == "traced"
    analytic = _json(cli_runner, "--precision", "fp32")["memory"]
    # Both count the same step: within 10 % of each other (the CUDA terms differ a little by design).
    assert abs(record["memory"]["total"] / analytic["total"] - 1) < 0.10
