"""``batchpilot hardware`` CLI contract: JSON keys, exit codes, one-line errors, ``show --json`` round trips."""

from __future__ import annotations

import json

import pytest

from batchpilot.cli import app
from batchpilot.specs.hardware import accelerator_names, load_accelerator

SHOW_KEYS = {"name", "display_name", "vendor", "memory_bytes", "peak_flops_per_s",
             "memory_bandwidth_bytes_per_s", "intra_node_bandwidth_bytes_per_s", "intra_node_link",
             "sources", "notes"}


def test_list_json_has_every_accelerator(cli_runner) -> None:
    result = cli_runner.invoke(app, ["hardware", "list", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert [a["name"] for a in record["accelerators"]] == accelerator_names()
    assert all(set(a) == SHOW_KEYS for a in record["accelerators"])


def test_list_table(cli_runner) -> None:
    result = cli_runner.invoke(app, ["hardware", "list"])
    assert result.exit_code == 0
    assert "h100-sxm" in result.stdout and "mi300x" in result.stdout


def test_show_json_contract(cli_runner) -> None:
    result = cli_runner.invoke(app, ["hardware", "show", "a100-80gb", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert set(record) == SHOW_KEYS
    assert record["memory_bytes"] == 80 * 2**30
    assert record["peak_flops_per_s"] == {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12}
    assert set(record["sources"]["peak_flops.bf16"]) == {"url", "says", "dense", "verified_via"}


def test_show_table_names_sources(cli_runner) -> None:
    result = cli_runner.invoke(app, ["hardware", "show", "h100-sxm"])
    assert result.exit_code == 0
    assert "peak_flops.bf16" in result.stdout and "989.5 TFLOP/s dense" in result.stdout


def test_show_user_file(cli_runner, tmp_path) -> None:
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({
        "memory_bytes": 2**34, "peak_flops_per_s": {"fp32": 1e13, "fp16": 5e13},
        "memory_bandwidth_bytes_per_s": 5e11, "intra_node_bandwidth_bytes_per_s": 3.2e10,
    }))
    result = cli_runner.invoke(app, ["hardware", "show", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["memory_bytes"] == 2**34


def test_unknown_name_is_one_line_exit_2(cli_runner) -> None:
    result = cli_runner.invoke(app, ["hardware", "show", "h100"])
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: accelerator 'h100' is ambiguous: it matches ")
    assert "h100-sxm" in lines[0] and "h800" not in lines[0]


def test_hostile_file_is_one_line_exit_2(cli_runner, tmp_path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"memory_bytes": ')
    result = cli_runner.invoke(app, ["hardware", "show", str(path), "--json"])
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "not valid JSON" in result.stderr


@pytest.mark.parametrize("name", accelerator_names())
def test_show_json_loads_back_as_an_accelerator_file(cli_runner, tmp_path, name) -> None:
    """``hardware show NAME --json > gpu.json`` is a valid ``--gpu gpu.json``: every figure and source equal."""
    shown = cli_runner.invoke(app, ["hardware", "show", name, "--json"])
    assert shown.exit_code == 0, shown.output
    path = tmp_path / f"{name}.json"
    path.write_text(shown.stdout)
    again = cli_runner.invoke(app, ["hardware", "show", str(path), "--json"])
    assert again.exit_code == 0, again.output
    original, loaded = json.loads(shown.stdout), json.loads(again.stdout)
    assert loaded.pop("name") == str(path)  # a file's spec is named by its path (as any user file)
    original.pop("name")
    assert loaded == original
    assert load_accelerator(path).peak_flops == load_accelerator(name).peak_flops


def test_an_accelerator_file_answers_like_its_catalog_entry(cli_runner, tmp_path) -> None:
    path = tmp_path / "gpu.json"
    path.write_text(cli_runner.invoke(app, ["hardware", "show", "a100-80gb", "--json"]).stdout)
    base = ["memory", "--model", "tiny-llama-1m", "--seq-len", "128", "--micro-batch", "2", "--json"]
    by_name = json.loads(cli_runner.invoke(app, [*base, "--gpu", "a100-80gb"]).stdout)
    by_file = json.loads(cli_runner.invoke(app, [*base, "--gpu", str(path)]).stdout)
    assert by_file["gpu"]["memory_bytes"] == by_name["gpu"]["memory_bytes"] == 80 * 2**30
    assert by_file["memory"] == by_name["memory"]


@pytest.mark.parametrize(("change", "fragment"), [
    (lambda r: r["sources"].update({"peak_flops.fp8": {"url": "https://x"}}), "sources names 'peak_flops.fp8'"),
    (lambda r: r["sources"].update({"memory_bytes": "80GB"}), "sources.memory_bytes must be an object"),
    (lambda r: r["sources"]["memory_bytes"].update({"url": ""}), "sources.memory_bytes.url must be a non-empty"),
    (lambda r: r["sources"]["peak_flops.bf16"].update({"dense": False}), "peak_flops.bf16 must be the dense figure"),
    (lambda r: r.update({"memory_bytes": {"value": 2**34, "source": "https://x"}}), "given twice"),
    (lambda r: r.update({"sources": [1]}), "sources must be an object"),
])
def test_a_bad_sources_object_is_one_line(cli_runner, tmp_path, change, fragment) -> None:
    record = json.loads(cli_runner.invoke(app, ["hardware", "show", "a100-80gb", "--json"]).stdout)
    change(record)
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(record))
    result = cli_runner.invoke(app, ["hardware", "show", str(path)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
