"""The ``batchpilot model list|show`` contract: JSON keys and values, exit codes, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from batchpilot.cli import app
from batchpilot.specs.model import load_model, preset_names

SHOW_KEYS = {"params_total", "params_active", "params_embedding", "flops_per_token", "num_layers",
             "hidden_size", "vocab_size"}


def _ok_json(result: Any) -> Any:
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def _one_line_usage_error(result: Any) -> str:
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_list_json_names_every_preset(cli_runner: Any) -> None:
    record = _ok_json(cli_runner.invoke(app, ["model", "list", "--json"]))
    assert [m["name"] for m in record["models"]] == preset_names()
    by_name = {m["name"]: m for m in record["models"]}
    assert by_name["llama-3-8b"]["params_total"] == 8_030_261_248
    assert by_name["mixtral-8x7b"]["params_active"] < by_name["mixtral-8x7b"]["params_total"]


def test_list_table_shows_every_preset(cli_runner: Any) -> None:
    result = cli_runner.invoke(app, ["model", "list"])
    assert result.exit_code == 0
    for name in preset_names():
        assert name in result.stdout
    assert "8.03B" in result.stdout  # llama-3-8b


def test_show_json_has_the_contract_keys_and_values(cli_runner: Any) -> None:
    record = _ok_json(cli_runner.invoke(app, ["model", "show", "llama-3-8b", "--json"]))
    assert set(record) >= SHOW_KEYS
    spec = load_model("llama-3-8b")
    assert record["params_total"] == 8_030_261_248
    assert record["params_active"] == spec.params_active
    assert record["params_embedding"] == 2 * 128256 * 4096
    assert (record["num_layers"], record["hidden_size"], record["vocab_size"]) == (32, 4096, 128256)
    assert record["seq_len"] == 2048 and record["flops_per_token"] == spec.flops_per_token(2048)
    assert record["source"] == "https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json"


@pytest.mark.parametrize(("text", "tokens"), [("8192", 8192), ("8Ki", 8192), ("4K", 4000)])
def test_show_seq_len_accepts_counts_with_units(cli_runner: Any, text: str, tokens: int) -> None:
    record = _ok_json(cli_runner.invoke(app, ["model", "show", "tiny-llama-1m", "--json", "--seq-len", text]))
    assert record["seq_len"] == tokens
    assert record["flops_per_token"] == load_model("tiny-llama-1m").flops_per_token(tokens)


def test_show_reads_a_config_path_and_a_folder(cli_runner: Any, tmp_path: Path) -> None:
    config = dict(model_type="mistral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    (tmp_path / "config.json").write_text(json.dumps(config))
    by_file = _ok_json(cli_runner.invoke(app, ["model", "show", str(tmp_path / "config.json"), "--json"]))
    by_dir = _ok_json(cli_runner.invoke(app, ["model", "show", str(tmp_path), "--json"]))
    assert by_file["params_total"] == by_dir["params_total"] == load_model(tmp_path).params_total
    assert by_file["family"] == "llama"


def test_show_table_prints_the_counts(cli_runner: Any) -> None:
    result = cli_runner.invoke(app, ["model", "show", "gpt2"])
    assert result.exit_code == 0
    assert "124,439,808" in result.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["model", "show", "llama-3-8"], "unknown model preset 'llama-3-8'. Did you mean 'llama-3-8b'?"),
        (["model", "show", "llama-3-8b", "--seq-len", "0"], "--seq-len '0' must be a positive whole number"),
        (["model", "show", "llama-3-8b", "--seq-len", "-5"], "--seq-len '-5'"),
        (["model", "show", "llama-3-8b", "--seq-len", "lots"], "--seq-len 'lots' is not a number"),
        (["model", "show", "./missing/config.json"], "does not exist"),
    ],
)
def test_show_bad_input_is_one_line_exit_2(cli_runner: Any, args: list[str], fragment: str) -> None:
    assert fragment in _one_line_usage_error(cli_runner.invoke(app, args))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{"model_type": "bert", "hidden_size": 768}', "unsupported model_type 'bert'"),
        ('{"model_type": "llama", "hidden_size": 64', "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"model_type": "llama", "num_attention_heads": 4}', "'hidden_size' is missing"),
        ('{"model_type": "llama", "hidden_size": NaN}', "NaN is not a valid JSON number"),
    ],
)
def test_show_bad_config_file_is_one_line_exit_2(cli_runner: Any, tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(text)
    assert fragment in _one_line_usage_error(cli_runner.invoke(app, ["model", "show", str(path), "--json"]))
