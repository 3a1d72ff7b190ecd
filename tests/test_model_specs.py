"""ModelSpec: published parameter counts, equality with ``transformers``, FLOPs formulas, input errors.

Sources of the numbers:
- Parameter counts: the safetensors totals of the Hugging Face checkpoints (GPT-2 124,439,808;
  Llama-2-7B 6,738,415,616; Llama-3-8B 8,030,261,248; Mistral-7B 7,241,732,096; Mixtral-8x7B
  46,702,792,704), the Mistral AI Mixtral announcement (12.9B active of 46.7B) and the DeepSeek-V3
  report (arXiv:2412.19437, §1/§4.2: 671B total, 37B activated per token; its README: 685B on the
  Hub = 671B main model + 14B MTP module).
- Equality with ``transformers``: the real module built on the meta device (no memory, no weights).
- FLOPs and GPT parameters: Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on
  GPU Clusters Using Megatron-LM", Eq. 2 and Eq. 3 (factor 72 without activation recomputation).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from batchpilot.errors import BatchpilotError, SpecError, UnknownNameError
from batchpilot.specs.model import ModelSpec, from_hf_config, load_model, preset_names, preset_path

DEBUG_PRESETS = {"tiny-llama-1m", "tiny-llama-15m"}


def build_meta_model(config: dict[str, Any]) -> Any:
    """The ``transformers`` causal LM for ``config`` on the meta device (shapes only, instant)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    hf_config = transformers.AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(hf_config)


def numel(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- published counts
@pytest.mark.parametrize(
    ("preset", "published"),
    [
        ("gpt2", 124_439_808),
        ("llama-2-7b", 6_738_415_616),
        ("llama-3-8b", 8_030_261_248),
        ("mistral-7b", 7_241_732_096),
        ("mixtral-8x7b", 46_702_792_704),
    ],
)
def test_params_total_equals_published_checkpoint_count(preset: str, published: int) -> None:
    assert load_model(preset).params_total == published


def test_mixtral_active_params_match_published_12_9b() -> None:
    # Published as "12.9B" (one decimal): ±0.05B, i.e. ±0.4%. Ours: all but 6 of 8 experts per layer.
    spec = load_model("mixtral-8x7b")
    assert spec.params_active == pytest.approx(12.9e9, abs=0.05e9)
    assert spec.params_active == spec.params_total - 32 * 6 * 3 * 4096 * 14336


def test_qwen2_5_7b_matches_model_card() -> None:
    # Qwen2.5-7B(-Instruct) model card: "Number of Parameters: 7.61B; (Non-Embedding): 6.53B". Ours are
    # 7.6156B and 6.5256B: the card truncates one and rounds the other, so the tolerance is 0.1%.
    spec = load_model("qwen2.5-7b")
    assert spec.params_total == pytest.approx(7.61e9, rel=0.001)
    assert spec.params_non_embedding == pytest.approx(6.53e9, rel=0.001)


def test_llama_3_1_405b_is_405b() -> None:
    # Llama 3 Herd of Models (arXiv:2407.21783) Table 3: 405B, 126 layers, d=16,384, FFN 53,248, 128/8 heads.
    assert load_model("llama-3.1-405b").params_total == pytest.approx(405e9, rel=0.005)


def test_deepseek_v3_total_and_active_match_report() -> None:
    spec = load_model("deepseek-v3")
    # "671B" rounds to whole billions: ±0.5B. The count excludes the MTP module, as the report does.
    assert spec.params_total == pytest.approx(671e9, abs=0.5e9)
    # "37B activated": whole billions, and the report does not say whether the input-embedding lookup
    # (V·h = 0.93B) is counted; ours counts it (37.55B; 36.63B without). Tolerance 3% covers both.
    assert spec.params_active == pytest.approx(37e9, rel=0.03)
    assert spec.params_active - spec.vocab_size * spec.hidden_size == pytest.approx(37e9, rel=0.03)
    # Hub total 685B = main + MTP module, whose checkpoint stores its own copy of the embedding and head.
    hub_total = spec.params_total + spec.params_mtp + 2 * spec.vocab_size * spec.hidden_size
    assert hub_total == pytest.approx(685e9, abs=0.75e9)


# ---------------------------------------------------------------------------- equality with transformers
@pytest.mark.parametrize("preset", preset_names())
def test_params_total_equals_transformers_module(preset: str) -> None:
    spec = load_model(preset)
    assert spec.params_total == numel(build_meta_model(dict(spec.hf_config)))


_TINY_LLAMA = dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
_TINY_MLA = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=100, max_position_embeddings=64,
                 kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                 n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1,
                 n_group=1, topk_group=1)

VARIANTS: dict[str, dict[str, Any]] = {
    # Llama honours both bias flags and an explicit head_dim (Gemma-style h != heads × head_dim).
    "llama-biases-head-dim": {**_TINY_LLAMA, "attention_bias": True, "mlp_bias": True, "head_dim": 24},
    "llama-tied-mha": {**_TINY_LLAMA, "num_key_value_heads": None, "tie_word_embeddings": True},
    # Mistral's module has no biases whatever the config says; a missing kv-head count defaults to 8.
    "mistral-bias-flags-ignored": {**_TINY_LLAMA, "model_type": "mistral", "attention_bias": True,
                                   "mlp_bias": True, "num_attention_heads": 8, "num_key_value_heads": ...},
    # Qwen2: Q/K/V biases always, never O or MLP; missing kv heads default to 32.
    "qwen2-default-kv-heads": {**_TINY_LLAMA, "model_type": "qwen2", "mlp_bias": True, "hidden_size": 128,
                               "num_attention_heads": 32, "num_key_value_heads": ..., "tie_word_embeddings": True},
    "mixtral-small": {**_TINY_LLAMA, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2},
    "gpt2-untied-n-inner": dict(model_type="gpt2", n_embd=64, n_head=4, n_layer=2, n_positions=32,
                                vocab_size=100, n_inner=80, tie_word_embeddings=False),
    # DeepSeek-V2-Lite style: no query LoRA (null), MLP biases on dense and shared experts only.
    "deepseek-v2-lite-biases": {**_TINY_MLA, "model_type": "deepseek_v2", "q_lora_rank": None,
                                "attention_bias": True, "mlp_bias": True},
    "deepseek-v2-query-lora": {**_TINY_MLA, "model_type": "deepseek_v2"},
    # DeepSeek-V3 with attention biases (q_a, kv_a, o); a missing first_k_dense_replace defaults to 3.
    "deepseek-v3-biases-default-dense": {**_TINY_MLA, "model_type": "deepseek_v3", "attention_bias": True,
                                         "num_hidden_layers": 5, "first_k_dense_replace": ...},
    # A missing q_lora_rank means transformers' default 1536, not "no query LoRA".
    "deepseek-v3-default-q-lora": {**_TINY_MLA, "model_type": "deepseek_v3", "q_lora_rank": ...},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_params_equal_transformers_module(variant: str) -> None:
    config = {k: v for k, v in VARIANTS[variant].items() if v is not ...}  # `...` = key absent
    spec = from_hf_config(config, name=variant)
    assert spec.params_total == numel(build_meta_model(config))


def test_deepseek_v3_correction_bias_is_a_buffer_not_a_parameter() -> None:
    config = {**_TINY_MLA, "model_type": "deepseek_v3"}
    model = build_meta_model(config)
    buffers = [n for n, _ in model.named_buffers() if n.endswith("e_score_correction_bias")]
    assert len(buffers) == 3 - 1  # one per MoE layer
    assert not any(n.endswith("e_score_correction_bias") for n, _ in model.named_parameters())
    assert from_hf_config(config).params_total == numel(model)


def test_missing_fields_take_transformers_class_defaults() -> None:
    mistral = from_hf_config({k: v for k, v in _TINY_LLAMA.items() if k != "num_key_value_heads"}
                             | {"model_type": "mistral", "num_attention_heads": 8})
    assert mistral.num_kv_heads == 8
    v3 = from_hf_config({k: v for k, v in _TINY_MLA.items() if k not in ("first_k_dense_replace", "q_lora_rank")}
                        | {"model_type": "deepseek_v3", "num_hidden_layers": 5})
    assert (v3.first_k_dense, v3.q_lora_rank, v3.num_mtp_layers) == (3, 1536, 1)
    lite = from_hf_config({**_TINY_MLA, "model_type": "deepseek_v2", "q_lora_rank": None})
    assert lite.q_lora_rank == 0


# ---------------------------------------------------------------------------- FLOPs and Eq. 2
def _gpt(h: int, layers: int, heads: int, vocab: int, seq: int) -> ModelSpec:
    return from_hf_config(dict(model_type="gpt2", n_embd=h, n_layer=layers, n_head=heads, vocab_size=vocab,
                               n_positions=seq), name=f"gpt-{h}x{layers}")


@pytest.mark.parametrize(
    ("h", "layers", "heads", "vocab", "seq"),
    [(768, 12, 12, 50257, 1024), (2048, 24, 16, 51200, 2048), (12288, 96, 96, 51200, 2048)],
)
def test_flops_match_narayanan_eq3_without_recompute(h: int, layers: int, heads: int, vocab: int, seq: int) -> None:
    spec = _gpt(h, layers, heads, vocab, seq)
    batch = 8
    eq3 = 72 * batch * seq * layers * h**2 * (1 + seq / (6 * h) + vocab / (12 * layers * h))
    assert spec.flops_per_token(seq) * batch * seq == pytest.approx(eq3, rel=0.01)
    assert spec.forward_flops_per_token(seq) == pytest.approx(spec.flops_per_token(seq) / 3, abs=1)


@pytest.mark.parametrize(
    ("h", "layers", "heads", "vocab", "seq"),
    [(768, 12, 12, 50257, 1024), (2048, 24, 16, 51200, 2048), (12288, 96, 96, 51200, 2048)],
)
def test_gpt_params_match_narayanan_eq2(h: int, layers: int, heads: int, vocab: int, seq: int) -> None:
    eq2 = 12 * layers * h**2 * (1 + 13 / (12 * h) + (vocab + seq) / (12 * layers * h))
    # Eq. 2 omits only the final LayerNorm (2h); tied head as in Megatron and GPT-2.
    assert _gpt(h, layers, heads, vocab, seq).params_total == pytest.approx(eq2, rel=0.01)
    assert _gpt(h, layers, heads, vocab, seq).params_total - round(eq2) == 2 * h


def test_moe_flops_count_only_routed_top_k_experts() -> None:
    # Mixtral 8x7B (Jiang et al. 2024): per layer GQA attention, an 8-way router and 2 of 8 SwiGLU experts.
    spec = load_model("mixtral-8x7b")
    h, d, layers, vocab, m = 4096, 128, 32, 32000, 14336
    attention = h * (32 * d + 2 * 8 * d) + 32 * d * h
    per_layer = attention + 8 * h + 2 * 3 * h * m
    assert spec.matmul_params_per_token == layers * per_layer + vocab * h
    assert spec.flops_per_token(4096) == 6 * (layers * per_layer + vocab * h) + 6 * layers * 4096 * 32 * 2 * d


def test_dense_matmul_params_are_active_params_less_lookup_and_norms() -> None:
    for name in ("llama-3-8b", "mistral-7b", "llama-2-70b"):
        spec = load_model(name)
        norms = spec.num_layers * 2 * spec.hidden_size + spec.hidden_size
        lookup = spec.vocab_size * spec.hidden_size
        assert spec.matmul_params_per_token == spec.params_active - lookup - norms


def test_flops_reject_a_bad_sequence_length() -> None:
    spec = load_model("tiny-llama-1m")
    for bad in (0, -1, True, 2.5):
        with pytest.raises(SpecError, match="seq_len"):
            spec.flops_per_token(bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- every preset
@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_loads_with_source_and_sane_values(preset: str) -> None:
    spec = load_model(preset)
    raw = json.loads(preset_path(preset).read_text())
    assert spec.name == preset and spec.model_type == raw["model_type"]
    if preset in DEBUG_PRESETS:
        assert spec.source
    elif spec.source.startswith("https://arxiv.org/abs/"):  # no published config.json: built from a paper's table
        assert raw["_source"] and raw["_notes"]
    else:
        assert spec.source.startswith("https://huggingface.co/") and spec.source.endswith("/config.json")
    assert not any(k.startswith("_") for k in spec.hf_config)
    assert 0 < spec.params_embedding < spec.params_total
    assert 0 < spec.params_active <= spec.params_total
    assert spec.is_moe == (spec.params_active < spec.params_total)
    assert spec.num_heads % spec.num_kv_heads == 0 and spec.head_dim_qk > 0 and spec.head_dim_v > 0
    # 6·N_matmul lies between 6 × the non-embedding active weights and 6 × (active + a second V·h head).
    matmul_flops = spec.flops_per_token(2048) - spec.attention_flops_per_token(2048)
    head = spec.vocab_size * spec.hidden_size
    assert 6 * (spec.params_active - spec.params_embedding) < matmul_flops <= 6 * (spec.params_active + head)
    record = spec.to_dict(seq_len=2048)
    assert json.loads(json.dumps(record)) == record


def test_preset_names_cover_the_issue_list() -> None:
    wanted = {"gpt2", "llama-2-7b", "llama-2-70b", "llama-3-8b", "llama-3-70b", "llama-3.1-405b",
              "mistral-7b", "mixtral-8x7b", "qwen2.5-7b", "deepseek-v3"}
    assert wanted <= set(preset_names())


def test_llama_3_1_keeps_its_rope_scaling() -> None:
    rope = load_model("llama-3.1-405b").hf_config["rope_scaling"]
    assert rope == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192, "rope_type": "llama3"}


# ---------------------------------------------------------------------------- errors
def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text
    return text


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"model_type": "bert"}, "unsupported model_type 'bert'"),
        ({"model_type": None}, "model_type"),
        ({"model_type": 7}, "model_type"),
        ({"hidden_size": None}, "'hidden_size' is missing"),
        ({"hidden_size": "4096"}, "'hidden_size' must be an integer"),
        ({"hidden_size": True}, "'hidden_size' must be an integer"),
        ({"num_hidden_layers": 2.5}, "'num_hidden_layers' must be an integer"),
        ({"num_hidden_layers": math.nan}, "'num_hidden_layers' must be an integer"),
        ({"vocab_size": math.inf}, "'vocab_size' must be an integer"),
        ({"vocab_size": -1}, "'vocab_size' = -1 is out of range"),
        ({"vocab_size": 0}, "'vocab_size' = 0 is out of range"),
        ({"intermediate_size": 2**40}, "is out of range"),
        ({"tie_word_embeddings": "yes"}, "'tie_word_embeddings' must be true or false"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
        ({"hidden_size": 66, "head_dim": None}, "not divisible by num_attention_heads"),
    ],
)
def test_bad_llama_fields_raise_one_line_spec_error(change: dict[str, Any], fragment: str) -> None:
    config = {**_TINY_LLAMA, **change}
    if change.get("hidden_size") is None and "hidden_size" in change:
        del config["hidden_size"]
    if "head_dim" in change:
        del config["head_dim"]
    with pytest.raises(SpecError) as caught:
        from_hf_config(config, name="cfg.json")
    assert fragment in _one_line(caught.value)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"num_experts_per_tok": 9}, "num_experts_per_tok 9 must be in [1, 8]"),
        ({"first_k_dense_replace": 4}, "first_k_dense_replace 4 exceeds 3 layers"),
        ({"moe_layer_freq": 2}, "moe_layer_freq"),
        ({"n_routed_experts": 0}, "'n_routed_experts' = 0 is out of range"),
        ({"kv_lora_rank": None}, "'kv_lora_rank' is missing"),
    ],
)
def test_bad_mla_fields_raise_one_line_spec_error(change: dict[str, Any], fragment: str) -> None:
    with pytest.raises(SpecError) as caught:
        from_hf_config({**_TINY_MLA, "model_type": "deepseek_v3", **change})
    assert fragment in _one_line(caught.value)


@pytest.mark.parametrize("bad", [[1, 2], "llama", None, 3])
def test_a_config_must_be_a_mapping(bad: Any) -> None:
    with pytest.raises(SpecError, match="must be a JSON object"):
        from_hf_config(bad)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{"model_type": "llama", "hidden_size": 64', "is not valid JSON"),
        ("[1, 2, 3]", "must hold a JSON object, got list"),
        ('{"model_type": "llama", "hidden_size": NaN}', "NaN is not a valid JSON number"),
        ('{"model_type": "llama", "hidden_size": Infinity}', "Infinity is not a valid JSON number"),
        ("", "is not valid JSON"),
        ("[" * 100_000, "nested too deeply"),
    ],
)
def test_bad_config_files_raise_one_line_spec_error(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(SpecError) as caught:
        load_model(path)
    assert fragment in _one_line(caught.value)


def test_binary_and_missing_files_raise_spec_error(tmp_path: Path) -> None:
    binary = tmp_path / "config.json"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(SpecError, match="cannot be read"):
        load_model(binary)
    with pytest.raises(SpecError, match="does not exist"):
        load_model(tmp_path / "nope" / "config.json")


def test_directory_and_path_inputs_load_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(_TINY_LLAMA))
    assert load_model(tmp_path).params_total == load_model(tmp_path / "config.json").params_total
    assert load_model(str(tmp_path)).source == str((tmp_path / "config.json").resolve())


def test_unknown_preset_names_the_closest_match() -> None:
    with pytest.raises(UnknownNameError) as caught:
        load_model("llama-3-8")
    assert "Did you mean 'llama-3-8b'" in _one_line(caught.value)
    assert isinstance(caught.value, BatchpilotError)
