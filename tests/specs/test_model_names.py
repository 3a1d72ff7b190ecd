"""Model preset names: case, separators, aliases (Hugging Face hub ids) and word prefixes; hub ids read from the
local Hugging Face cache, never downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchpilot.errors import UnknownNameError
from batchpilot.names import AmbiguousNameError
from batchpilot.specs.model import load_model, preset_path

_SMALL = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
          "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face hub cache of this test only (``HF_HUB_CACHE`` wins over ``HF_HOME``)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def _cache_config(cache: Path, repo_id: str, config: dict[str, object], revision: str = "0123abcd") -> Path:
    """Lay out a cached ``config.json`` as ``huggingface_hub`` does: models--ORG--NAME/{refs/main, snapshots/REV/}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(config))
    return snapshot / "config.json"


def test_preset_names_ignore_case_and_separators() -> None:
    reference = load_model("llama-3-8b")
    for typed in ("Llama-3-8B", "llama3-8b", "Llama 3 8B", " LLAMA_3_8B "):
        spec = load_model(typed)
        assert (spec.name, spec.params_total) == ("llama-3-8b", reference.params_total)
    assert preset_path("Mistral-7B").name == "mistral-7b.json"


def test_a_family_prefix_asks_and_never_returns_another_family() -> None:
    with pytest.raises(AmbiguousNameError) as info:
        load_model("llama-3")
    message = str(info.value)
    assert "it matches llama-3-70b, llama-3-8b; name one of them" in message
    assert "llama-33b" not in message and "llama-3.1" not in message and "\n" not in message
    assert load_model("mistral").name == "mistral-7b"  # one preset starts with that word


def test_a_number_never_matches_part_of_another_number() -> None:
    with pytest.raises(UnknownNameError) as info:
        load_model("llama-2-7")  # the 7B or the 70B? not a prefix of either
    assert not isinstance(info.value, AmbiguousNameError)


def test_hub_id_of_a_preset_loads_the_preset(hub_cache: Path) -> None:
    spec = load_model("meta-llama/Meta-Llama-3-8B")
    assert spec.name == "llama-3-8b"
    assert spec.source == "https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json"
    assert load_model("Meta-Llama-3-8B").name == "llama-3-8b"  # the hub name alone


def test_hub_id_is_read_from_the_local_cache(hub_cache: Path) -> None:
    cached = _cache_config(hub_cache, "acme/tiny-model", _SMALL)
    spec = load_model("acme/tiny-model")
    assert spec.num_layers == 2 and spec.source == str(cached.resolve())


def test_the_cache_wins_over_the_preset_copy(hub_cache: Path) -> None:
    _cache_config(hub_cache, "meta-llama/Meta-Llama-3-8B", _SMALL)
    assert load_model("meta-llama/Meta-Llama-3-8B").num_layers == 2


def test_hub_id_not_here_is_explained_in_one_line(hub_cache: Path) -> None:
    with pytest.raises(UnknownNameError) as info:
        load_model("Qwen/Qwen3-8B")
    message = str(info.value)
    assert "\n" not in message
    assert "Hugging Face hub id" in message and "nothing is downloaded" in message
    assert str(hub_cache / "models--Qwen--Qwen3-8B") in message
    assert "config.json" in message
