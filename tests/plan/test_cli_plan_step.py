"""``batchpilot plan`` explains the winner's step by part (table and ``--json``) and takes the cluster's network."""

from __future__ import annotations

import json

import pytest

from batchpilot.cli import app

BASE = ["plan", "--model", "llama-3-8b", "--gpu", "h100-sxm", "--gpus", "32", "--seq-len", "8192",
        "--global-batch", "256", "--top", "2"]


def _json(cli_runner, *args: str) -> dict:
    result = cli_runner.invoke(app, [*BASE, *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_json_step_has_its_parts_and_they_add_up(cli_runner):
    for plan in _json(cli_runner)["plans"]:
        step = plan["step"]
        assert {"compute_gemm_s", "compute_attention_s", "compute_elementwise_s", "exposed_dp_s", "exposed_tp_s",
                "bubble_s", "optimizer_s"} <= set(step)
        parts = sum(v for k, v in step.items() if k.startswith(("compute_", "exposed_")) and k != "compute_s")
        assert parts + step["bubble_s"] + step["optimizer_s"] == pytest.approx(step["step_time_s"])
        assert step["compute_gemm_s"] > step["compute_elementwise_s"] > 0


def test_table_explains_the_winners_step(cli_runner):
    result = cli_runner.invoke(app, BASE)
    assert result.exit_code == 0, result.output
    assert "winner's step" in result.stdout and "matrix multiplies" in result.stdout
    assert "kernel speeds: hopper profile, attention fa2" in result.stdout


def test_network_sets_the_bandwidth_and_is_named_in_the_record(cli_runner):
    """EFA p4d: 4 × 100 Gb/s ports for 8 GPUs = 6.25e9 B/s per GPU, measured at 85 % of the node's NIC sum; a
    slower network than the default 400 Gb/s per GPU makes data-parallel communication longer."""
    pins = ("--engine", "fsdp2", "--tp", "1", "--pp", "1", "--zero", "3", "--micro-batch", "1")
    slow = _json(cli_runner, "--network", "efa-p4d", *pins)
    fast = _json(cli_runner, *pins)
    assert slow["cluster"]["network"] == "efa-p4d" and fast["cluster"]["network"] is None
    assert slow["cluster"]["inter_node_bandwidth_bytes_per_s"] == pytest.approx(4 * 12.5e9 / 8)
    assert slow["plans"][0]["step"]["dp_comm_s"] > fast["plans"][0]["step"]["dp_comm_s"]


def test_a_scale_up_network_is_refused_in_one_line(cli_runner):
    result = cli_runner.invoke(app, [*BASE, "--network", "nvl72"])
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "\n" not in line and "--network nvl72" in line and "--gpus-per-node 72" in line
