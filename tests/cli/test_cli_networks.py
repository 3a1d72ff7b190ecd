"""``batchpilot hardware networks`` CLI contract: JSON keys, aliases, one-line errors, whole URLs."""

from __future__ import annotations

import json

from batchpilot.cli import app
from batchpilot.specs.network import load_network, network_names


def test_networks_json_lists_every_network(cli_runner) -> None:
    result = cli_runner.invoke(app, ["hardware", "networks", "--json"])
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)["networks"]
    assert [r["name"] for r in records] == network_names()
    assert all(r == load_network(r["name"]).to_dict() for r in records)


def test_one_network_by_alias(cli_runner) -> None:
    result = cli_runner.invoke(app, ["hardware", "networks", "P5", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert (record["name"], record["nics_per_node"], record["per_gpu_bandwidth_bytes_per_s"]) == ("efa-p5", 32, 50e9)


def test_table_shows_link_peak_and_measured(cli_runner) -> None:
    result = cli_runner.invoke(app, ["hardware", "networks", "ib-ndr"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "8 × 400" in result.stdout and "376 (94% of" in result.stdout
    assert "  https://github.com/NVIDIA/nccl-tests/issues/290" in result.stdout.splitlines()  # whole, own line


def test_ambiguous_network_is_one_line_exit_2(cli_runner) -> None:
    result = cli_runner.invoke(app, ["hardware", "networks", "efa"])
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: network 'efa' is ambiguous: it matches efa-p4d")
