"""``batchpilot known`` CLI contract: JSON keys, exit codes, one-line errors."""

from __future__ import annotations

import json

from batchpilot.cli import app
from batchpilot.plan.registry import names

ENTRY_KEYS = {"name", "aliases", "model", "stage", "published", "global_batch_sequences", "global_batch_tokens",
              "tokens_as_published", "seq_len", "schedule", "hardware", "total_training_tokens", "source",
              "verification", "notes"}


def test_known_json_lists_everything(cli_runner) -> None:
    result = cli_runner.invoke(app, ["known", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["query"] == ""
    assert sorted(e["name"] for e in record["entries"]) == names()
    assert all(set(e) == ENTRY_KEYS for e in record["entries"])


def test_known_query_json(cli_runner) -> None:
    result = cli_runner.invoke(app, ["known", "deepseek-v3", "--json"])
    assert result.exit_code == 0, result.output
    (v3,) = [e for e in json.loads(result.stdout)["entries"] if e["name"] == "deepseek-v3"]
    assert v3["global_batch_sequences"] == 15360
    assert v3["schedule"]["start_sequences"] == 3072
    assert v3["schedule"]["over_tokens_max"] == 469_000_000_000
    assert set(v3["source"]) == {"title", "url", "section", "quote"}


def test_known_table(cli_runner) -> None:
    result = cli_runner.invoke(app, ["known", "qwen"])
    assert result.exit_code == 0
    assert "qwen2.5" in result.stdout and "not published" in result.stdout


def test_known_no_match_is_one_line_exit_2(cli_runner) -> None:
    result = cli_runner.invoke(app, ["known", "gpt-5"])
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no registry entry matches 'gpt-5'")


def test_one_name_shows_the_whole_entry(cli_runner) -> None:
    """An exact name (even when the words match others too) shows the entry's source section and quote."""
    from batchpilot.plan.registry import search

    (v3,) = [e for e in search("deepseek-v3") if e.name == "deepseek-v3"]
    result = cli_runner.invoke(app, ["known", "deepseek-v3"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "15,360 seqs × 4096 = 62.91M tok" in result.stdout
    assert v3.source.quote in result.stdout and v3.source.url in result.stdout
    assert "deepseek-r1" not in result.stdout


def test_the_list_shows_every_match_in_80_columns(cli_runner) -> None:
    result = cli_runner.invoke(app, ["known", "llama"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    from batchpilot.plan.registry import search

    assert all(e.name in result.stdout for e in search("llama"))
