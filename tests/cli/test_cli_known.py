"""``batchpilot known`` CLI contract: JSON keys, exit codes, one-line errors."""

from __future__ import annotations

import json

import pytest

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


def test_a_family_name_matches_whole_words_only(cli_runner) -> None:
    """`known llama-3` is the Llama 3 family, never LLaMA 33B ("llama-3" is not a prefix of "33b")."""
    result = cli_runner.invoke(app, ["known", "llama-3", "--json"])
    assert result.exit_code == 0, result.output
    found = {e["name"] for e in json.loads(result.stdout)["entries"]}
    assert "llama-33b" not in found
    assert {"llama-3-405b", "llama-3-8b", "llama-3-70b"} <= found


def test_a_model_whose_batch_was_not_published_says_so(cli_runner) -> None:
    result = cli_runner.invoke(app, ["known", "Llama-3-8B"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert "not published" in result.stdout and "Llama 3 8B" in result.stdout
    assert "llama-2-7b" not in result.stdout  # one entry, not a list of every llama


def test_registry_names_ask_when_ambiguous() -> None:
    from batchpilot.names import AmbiguousNameError
    from batchpilot.plan.registry import NotPublishedError, lookup, target_global_batch

    with pytest.raises(AmbiguousNameError, match="it matches llama-3-405b, llama-3-70b, llama-3-8b; name one"):
        lookup("llama-3")
    with pytest.raises(NotPublishedError, match="not published"):
        target_global_batch("llama-3-70b", seq_len=8192)


@pytest.mark.parametrize("query", ["llama", "deepseek-v2-lite", "qwen"])
def test_source_urls_are_printed_whole(cli_runner, query: str) -> None:
    """In 80 columns no URL is cut or wrapped mid-word: each appears in one piece (a terminal link)."""
    from batchpilot.plan.registry import search

    result = cli_runner.invoke(app, ["known", query], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert all(any(e.source.url in line for line in lines) for e in search(query))
