"""The registry of published batch sizes: sources, the numbers the papers state, conversion, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchpilot.errors import BatchpilotError, SpecError, UnknownNameError
from batchpilot.plan import registry
from batchpilot.plan.registry import NotPublishedError, entries, lookup, names, search, target_global_batch

ALL = entries()


@pytest.mark.parametrize("entry", ALL, ids=[e.name for e in ALL])
def test_every_entry_has_a_source_and_says_how_it_was_checked(entry: registry.RegistryEntry) -> None:
    assert entry.source.url.startswith("https://")
    assert entry.source.section.strip() and entry.source.quote.strip() and entry.source.title.strip()
    assert entry.verification.strip()
    if entry.published and entry.stage == "pretraining":
        assert entry.global_batch_tokens == entry.global_batch_sequences * entry.seq_len  # type: ignore[operator]


def test_deepseek_v3_ramp() -> None:
    # DeepSeek-V3 Technical Report §4.2: "gradually increased from 3072 to 15360 in the training of the
    # first 469B tokens"; 4K sequences; 2048 H800 GPUs (§3.1).
    v3 = lookup("deepseek-v3")
    assert (v3.global_batch_sequences, v3.seq_len) == (15360, 4096)
    assert v3.global_batch_tokens == 15360 * 4096 == 62_914_560
    assert v3.schedule is not None and v3.schedule.kind == "ramp"
    assert v3.schedule.start_sequences == 3072
    assert v3.schedule.over_tokens_min == v3.schedule.over_tokens_max == 469_000_000_000
    assert v3.total_training_tokens == 14_800_000_000_000
    assert v3.hardware is not None and "2048" in v3.hardware and "H800" in v3.hardware


def test_deepseek_r1_rl_batch() -> None:
    # DeepSeek-R1 (Nature 2025) supplementary: "32 unique questions, resulting in a training batch size of 512".
    r1 = lookup("DeepSeek-R1")
    assert r1.stage == "rl"
    assert r1.global_batch_sequences == 32 * 16 == 512
    assert r1.global_batch_tokens is None
    assert "512" in r1.source.quote and "8,192 outputs" in r1.source.quote


def test_gpt3_175b_is_3_2m_tokens() -> None:
    # Brown et al. 2020, Table 2.1: 175B trained with a 3.2M-token batch of 2048-token sequences.
    gpt3 = lookup("gpt-3-175b")
    assert gpt3.tokens_as_published == "3.2M"
    assert (gpt3.global_batch_sequences, gpt3.seq_len, gpt3.global_batch_tokens) == (1536, 2048, 3_145_728)
    assert round(gpt3.global_batch_tokens / 1e6, 1) == 3.1  # type: ignore[operator]  # 3.15M, printed "3.2M"
    assert gpt3.schedule is not None and gpt3.schedule.start_tokens == 32 * 1024
    assert (gpt3.schedule.over_tokens_min, gpt3.schedule.over_tokens_max) == (4e9, 12e9)


@pytest.mark.parametrize(
    ("name", "published_m"),
    [("gpt-3-125m", 0.5), ("gpt-3-760m", 0.5), ("gpt-3-1.3b", 1), ("gpt-3-2.7b", 1), ("gpt-3-6.7b", 2),
     ("gpt-3-13b", 2)],
)
def test_gpt3_table_2_1(name: str, published_m: float) -> None:
    e = lookup(name)
    assert e.tokens_as_published == f"{published_m:g}M"
    # whole 2048-token sequences within 5% of the printed value
    assert e.global_batch_tokens == pytest.approx(published_m * 1e6, rel=0.05)


def test_llama_family() -> None:
    assert lookup("llama-65b").global_batch_tokens == 4 * 2**20 == 2048 * 2048
    assert (lookup("Llama 2 70B").global_batch_sequences, lookup("llama2-70b").seq_len) == (1024, 4096)
    l3 = lookup("llama-3-405b")
    assert l3.schedule is not None
    stages = [(s.after_tokens, s.global_batch_tokens, s.seq_len) for s in l3.schedule.stages]
    assert stages == [(0, 4 * 2**20, 4096), (252_000_000, 8 * 2**20, 8192), (2_870_000_000_000, 16 * 2**20, 8192)]


def test_deepseek_llm_and_v2() -> None:
    assert lookup("deepseek-llm-7b").global_batch_sequences == 2304
    assert lookup("deepseek-llm-67b").global_batch_sequences == 4608
    v2 = lookup("deepseek_v2")
    assert v2.schedule is not None
    assert (v2.schedule.start_sequences, v2.global_batch_sequences, v2.schedule.over_tokens_max) == (
        2304, 9216, 225_000_000_000)


@pytest.mark.parametrize("name", ["qwen2.5", "Qwen 2.5", "mistral-7b"])
def test_not_published_entries_carry_no_numbers_and_refuse_a_target(name: str) -> None:
    e = lookup(name)
    assert not e.published
    assert e.global_batch_sequences is e.global_batch_tokens is e.schedule is None
    with pytest.raises(NotPublishedError, match="was not published") as info:
        target_global_batch(name, 4096)
    assert "\n" not in str(info.value) and "gpt-3-175b" in str(info.value)


def test_rl_entry_refuses_a_token_target() -> None:
    with pytest.raises(NotPublishedError, match="not a token batch"):
        target_global_batch("deepseek-r1", 4096)


@pytest.mark.parametrize(
    ("name", "seq_len", "sequences", "tokens"),
    [
        ("gpt-3-175b", 2048, 1536, 3_145_728),     # as published
        ("gpt-3-175b", 4096, 768, 3_145_728),      # same tokens, half the sequences
        ("llama-2-70b", 8192, 512, 4 * 2**20),
        ("deepseek-v3", 4096, 15360, 62_914_560),  # the final batch of the ramp
        ("llama-3-405b", 8192, 2048, 16 * 2**20),  # the last stage
        ("gpt-3-175b", 3000, 1049, 3_147_000),     # 3,145,728 / 3000 = 1048.6 -> nearest whole sequence
        ("gpt-3-125m", 10**7, 1, 10**7),           # never zero sequences
    ],
)
def test_target_global_batch_keeps_tokens(name: str, seq_len: int, sequences: int, tokens: int) -> None:
    got_sequences, got_tokens, entry = target_global_batch(name, seq_len)
    assert (got_sequences, got_tokens) == (sequences, tokens)
    assert entry is lookup(name)


@pytest.mark.parametrize("bad", [0, -4096, True, 2048.0])
def test_target_global_batch_rejects_bad_seq_len(bad: object) -> None:
    with pytest.raises(BatchpilotError, match="seq_len must be a positive whole number"):
        target_global_batch("gpt-3-175b", bad)  # type: ignore[arg-type]


def test_lookup_normalises_but_does_not_guess() -> None:
    assert lookup("GPT3 175B").name == "gpt-3-175b"
    assert lookup(" DeepSeek_V3 ").name == "deepseek-v3"
    with pytest.raises(UnknownNameError) as info:
        lookup("llama-2-7")
    message = str(info.value)
    assert "Did you mean 'llama-2-7b'?" in message
    assert all(n in message for n in names())


def test_search() -> None:
    assert {e.name for e in search("deepseek")} >= {"deepseek-v3", "deepseek-v2", "deepseek-llm-67b"}
    assert {e.name for e in search("H800")} == {"deepseek-v2", "deepseek-v3", "deepseek-r1-zero", "deepseek-r1",
                                                "deepseek-r1-stage2", "dapo"}
    assert [e.name for e in search("llama 2 70b")] == ["llama-2-70b"]
    assert search("") == list(entries())
    assert search("no-such-model") == []


# ---------------------------------------------------------------------- data validation
def _load_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: object) -> None:
    (tmp_path / "x.json").write_text(json.dumps(data))
    monkeypatch.setattr(registry, "_registry_dir", lambda: tmp_path)
    registry.entries.cache_clear()


@pytest.fixture()
def good_entry() -> dict[str, object]:
    return lookup("deepseek-v3").to_dict()


@pytest.fixture(autouse=True)
def _fresh_cache():
    registry.entries.cache_clear()
    yield
    registry.entries.cache_clear()


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"global_batch_tokens": 123}, "!= 15360 sequences × 4096"),
        ({"source": None}, "'source' must be an object"),
        ({"published": "yes"}, "'published' true or false"),
        ({"global_batch_sequences": -1}, "must be a whole number"),
        ({"schedule": {"kind": "exponential"}}, "schedule must be an object with kind"),
        ({"verification": ""}, "'verification' must be a non-empty string"),
    ],
)
def test_inconsistent_data_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       good_entry: dict[str, object], patch: dict[str, object], message: str) -> None:
    good_entry.pop("schedule")
    entry = good_entry | {"schedule": {"kind": "ramp", "start_sequences": 3072, "start_tokens": 3072 * 4096,
                                       "over_tokens_min": 1, "over_tokens_max": 1}} | patch
    _load_from(tmp_path, monkeypatch, {"entries": [entry]})
    with pytest.raises(SpecError, match=message):
        entries()


def test_not_published_entry_with_numbers_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = lookup("qwen2.5").to_dict() | {"global_batch_tokens": 4 * 2**20}
    _load_from(tmp_path, monkeypatch, {"entries": [entry]})
    with pytest.raises(SpecError, match="must not carry batch numbers"):
        entries()


def test_duplicate_alias_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = lookup("qwen2.5").to_dict()
    b = lookup("mistral-7b").to_dict() | {"aliases": ["Qwen 2.5"]}
    _load_from(tmp_path, monkeypatch, {"entries": [a, b]})
    with pytest.raises(SpecError, match="names both"):
        entries()
