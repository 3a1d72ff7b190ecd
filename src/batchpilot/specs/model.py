"""Model specs read from Hugging Face ``config.json`` files (a local path or a shipped preset name).

Examples::

    from batchpilot.specs.model import load_model
    spec = load_model("llama-3-8b")          # a shipped preset (see ``batchpilot model list``)
    spec.params_total                        # 8,030,261,248
    spec.flops_per_token(seq_len=8192)       # training FLOPs per token
    load_model("./my-model/config.json")     # any supported Hugging Face config

Supported families (``ModelSpec.family``):

- ``gpt2``    GPT-2: learned positions, LayerNorm with bias, fused QKV with bias, 4h GELU MLP, tied head.
- ``llama``   Llama-style dense decoders (``llama``, ``mistral``, ``qwen2``): RMSNorm, RoPE, GQA,
              SwiGLU MLP, tied or untied output head. Biases follow each ``transformers`` module:
              Llama honours ``attention_bias`` (Q, K, V and O) and ``mlp_bias``; Qwen2 always has
              Q/K/V biases and never O or MLP biases; Mistral has none.
- ``moe``     Mixtral-style sparse MoE (``mixtral``): the Mistral block with E SwiGLU experts, top-k router.
- ``mla``     DeepSeek-V2/V3 (``deepseek_v2``, ``deepseek_v3``): multi-head latent attention with or
              without a query LoRA, routed + shared experts, the first ``first_k_dense_replace`` layers
              dense, multi-token-prediction (MTP) modules counted separately (``params_mtp``).

Parameter counts are exact: they equal ``sum(p.numel() for p in model.parameters())`` of the
``transformers`` (5.x) model built from the same config (tested on the meta device for every preset
and for small variants of each family). Details that matter for exactness:

- Routed experts never have biases (Mixtral's and DeepSeek's fused expert tensors have none); shared
  experts are one SwiGLU MLP of width ``moe_intermediate_size × n_shared_experts``.
- DeepSeek-V3's ``e_score_correction_bias`` (aux-loss-free balancing) is a buffer updated outside the
  optimizer, not a parameter: not counted.
- MLA with ``attention_bias`` has biases on ``q_a_proj``, ``kv_a_proj_with_mqa`` and ``o_proj``.
- A field missing from the config takes the value the ``transformers`` config class defaults to for
  that ``model_type`` (e.g. Mistral's ``num_key_value_heads`` = 8, DeepSeek-V3's
  ``first_k_dense_replace`` = 3, ``q_lora_rank`` = 1536); an explicit ``null`` means "derive it"
  (``num_key_value_heads`` = heads, ``head_dim`` = hidden / heads, ``q_lora_rank`` = no query LoRA).

FLOPs convention (``flops_per_token``): every matmul a token passes through costs 2 FLOPs per weight
forward and 4 backward, so 6·N_matmul, where N_matmul counts the weight matrices a token actually
multiplies (active experts only, the router, and the output head — tied or not; the input embedding
is a lookup and costs nothing). Attention scores and values add 2·s·n_heads·(d_qk + d_v) forward per
token per layer, 3× that for training: 6·L·s·n_heads·(d_qk + d_v), no causal halving. For a GPT block
this is exactly Narayanan et al. 2021 Eq. 3 without recomputation, 72·l·h² + 12·l·h·s + 6·V·h per token
(= Kaplan et al. 2020's 6N + attention, plus the head). Norms, biases, softmax and activations are
elementwise and ignored (< 0.5% for h ≥ 512).
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from batchpilot.errors import SpecError, UnknownNameError
from batchpilot.io import path_is, read_json_object
from batchpilot.names import resolve

Family = Literal["gpt2", "llama", "moe", "mla"]

#: HF ``model_type`` -> family.
MODEL_TYPES: dict[str, Family] = {
    "gpt2": "gpt2",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "mixtral": "moe",
    "deepseek_v2": "mla",
    "deepseek_v3": "mla",
}

#: Defaults of the ``transformers`` (5.x) config classes for fields a config.json may omit, where the
#: default is not what an explicit ``null`` would mean. Read from ``configuration_<model_type>.py``.
_HF_DEFAULTS: dict[str, dict[str, int]] = {
    "mistral": {"num_key_value_heads": 8},
    "mixtral": {"num_key_value_heads": 8},
    "qwen2": {"num_key_value_heads": 32},
    "deepseek_v2": {"first_k_dense_replace": 0, "n_shared_experts": 2, "q_lora_rank": 1536,
                    "num_nextn_predict_layers": 0},
    "deepseek_v3": {"first_k_dense_replace": 3, "n_shared_experts": 1, "q_lora_rank": 1536,
                    "num_nextn_predict_layers": 1},
}

_MAX_DIM = 2**31  # no real model has a dimension beyond this; larger values are typos or hostile input


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelSpec:
    """The shape of a decoder-only transformer, as far as memory, FLOPs and parameters need it."""

    name: str
    """Preset name or the config file's path."""
    model_type: str
    """Hugging Face ``model_type`` (``llama``, ``deepseek_v3``, ...)."""
    family: Family
    """Block structure (see the module docstring)."""
    num_layers: int
    """Transformer blocks of the main model (MTP modules excluded)."""
    hidden_size: int
    """Residual-stream width h."""
    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads (GQA); equals ``num_heads`` for MHA. For MLA, ``num_heads`` (K/V are per head)."""
    head_dim_qk: int
    """Per-head query/key width (MLA: nope + rope dims)."""
    head_dim_v: int
    """Per-head value width."""
    intermediate_size: int
    """FFN width of a dense layer (GPT-2: ``n_inner`` or 4h)."""
    vocab_size: int
    """Rows of the token embedding (and of the output head)."""
    max_position_embeddings: int
    """Longest sequence the config allows (GPT-2: size of the learned position table)."""
    tie_word_embeddings: bool
    """Output head shares the input embedding's weight."""
    mlp_kind: Literal["gelu", "swiglu"]
    """Two-matrix GELU MLP or three-matrix gated SiLU MLP."""
    norm_kind: Literal["layernorm", "rmsnorm"]
    """LayerNorm (weight + bias) or RMSNorm (weight only)."""
    qkv_bias: bool = False
    """Biases on Q, K and V projections (GPT-2, Qwen2, Llama ``attention_bias``); for MLA, on
    ``q_a_proj`` and ``kv_a_proj_with_mqa``."""
    o_bias: bool = False
    """Bias on the attention output projection."""
    mlp_bias: bool = False
    """Biases on the dense FFN (and on DeepSeek-V2 shared experts); routed experts never have them."""
    learned_positions: bool = False
    """GPT-2's ``wpe`` table of ``max_position_embeddings × hidden_size``."""
    # --- mixture of experts (0 for dense models) ---
    num_experts: int = 0
    """Routed experts per MoE layer."""
    num_experts_per_token: int = 0
    """Routed experts each token is sent to (top-k)."""
    num_shared_experts: int = 0
    """Always-active experts per MoE layer (DeepSeek)."""
    moe_intermediate_size: int = 0
    """FFN width of one routed (and one shared) expert."""
    first_k_dense: int = 0
    """Leading layers with a dense FFN instead of experts (DeepSeek ``first_k_dense_replace``)."""
    # --- multi-head latent attention (DeepSeek-V2/V3) ---
    q_lora_rank: int = 0
    """0 when queries are projected directly (DeepSeek-V2-Lite)."""
    kv_lora_rank: int = 0
    """Width of the compressed K/V latent."""
    qk_rope_head_dim: int = 0
    """Per-head RoPE part of the query/key width (shared across heads for keys)."""
    num_mtp_layers: int = 0
    """Multi-token-prediction modules (DeepSeek-V3 ``num_nextn_predict_layers``)."""
    hf_config: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The config as read (keys starting with ``_`` removed): what ``transformers`` builds from."""
    source: str = ""
    """Where the config came from (a URL for presets)."""

    # ------------------------------------------------------------------ structure
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense if self.is_moe else 0

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - self.num_moe_layers

    # ------------------------------------------------------------------ parameters: (matmul weights, elementwise)
    def _attention_parts(self) -> tuple[int, int]:
        """One layer's attention as (matmul weights, biases + internal norms)."""
        h, nh = self.hidden_size, self.num_heads
        o_w, o_b = nh * self.head_dim_v * h, (h if self.o_bias else 0)
        if self.family == "mla":
            q_out = nh * self.head_dim_qk
            kv_a_out = self.kv_lora_rank + self.qk_rope_head_dim
            kv_b_out = nh * (self.head_dim_qk - self.qk_rope_head_dim + self.head_dim_v)
            if self.q_lora_rank:  # q_a_proj (+ bias), q_a_layernorm, q_b_proj
                q_w, q_e = h * self.q_lora_rank + self.q_lora_rank * q_out, self.q_lora_rank
                q_e += self.q_lora_rank if self.qkv_bias else 0
            else:  # q_proj, never a bias
                q_w, q_e = h * q_out, 0
            kv_w = h * kv_a_out + self.kv_lora_rank * kv_b_out
            kv_e = self.kv_lora_rank + (kv_a_out if self.qkv_bias else 0)  # kv_a_layernorm (+ bias)
            return q_w + kv_w + o_w, q_e + kv_e + o_b
        q_out, k_out = nh * self.head_dim_qk, self.num_kv_heads * self.head_dim_qk
        v_out = self.num_kv_heads * self.head_dim_v
        qkv_b = q_out + k_out + v_out if self.qkv_bias else 0
        return h * (q_out + k_out + v_out) + o_w, qkv_b + o_b

    def _ffn_parts(self, width: int, bias: bool) -> tuple[int, int]:
        """An MLP of inner width ``width`` as (matmul weights, biases)."""
        h = self.hidden_size
        if self.mlp_kind == "swiglu":
            return 3 * h * width, (2 * width + h if bias else 0)
        return 2 * h * width, (width + h if bias else 0)

    def _shared_experts_parts(self) -> tuple[int, int]:
        if not self.num_shared_experts:
            return 0, 0
        return self._ffn_parts(self.moe_intermediate_size * self.num_shared_experts, self.mlp_bias)

    # ------------------------------------------------------------------ parameters per component
    @property
    def params_attention(self) -> int:
        """Attention of one layer: projections, their biases and (MLA) the latent norms."""
        return sum(self._attention_parts())

    @property
    def params_dense_mlp(self) -> int:
        """The FFN of one dense layer."""
        return sum(self._ffn_parts(self.intermediate_size, self.mlp_bias))

    @property
    def params_expert(self) -> int:
        """One routed expert (no biases in any supported implementation)."""
        return self._ffn_parts(self.moe_intermediate_size, False)[0] if self.is_moe else 0

    @property
    def params_shared_experts(self) -> int:
        """All shared experts of one MoE layer (one MLP of width ``moe_intermediate_size × n``)."""
        return sum(self._shared_experts_parts())

    @property
    def params_router(self) -> int:
        """The gate of one MoE layer (E × h, no bias)."""
        return self.num_experts * self.hidden_size if self.is_moe else 0

    @property
    def params_moe_mlp(self) -> int:
        """The FFN block of one MoE layer: router, all routed experts, shared experts."""
        if not self.is_moe:
            return 0
        return self.params_router + self.num_experts * self.params_expert + self.params_shared_experts

    @property
    def params_norms_per_layer(self) -> int:
        """The two block norms (pre-attention, pre-FFN)."""
        return 2 * self._norm_params

    @property
    def _norm_params(self) -> int:
        return 2 * self.hidden_size if self.norm_kind == "layernorm" else self.hidden_size

    @property
    def params_dense_layer(self) -> int:
        return self.params_attention + self.params_dense_mlp + self.params_norms_per_layer

    @property
    def params_moe_layer(self) -> int:
        return self.params_attention + self.params_moe_mlp + self.params_norms_per_layer if self.is_moe else 0

    @property
    def params_embedding(self) -> int:
        """Input token embedding (+ GPT-2 position table) and, when untied, the output head."""
        table = self.vocab_size * self.hidden_size
        positions = self.max_position_embeddings * self.hidden_size if self.learned_positions else 0
        return table + positions + (0 if self.tie_word_embeddings else table)

    @property
    def params_final_norm(self) -> int:
        return self._norm_params

    @property
    def params_mtp(self) -> int:
        """DeepSeek-V3 MTP modules (not in ``params_total``; ``transformers`` does not build them).

        Per module (DeepSeek-V3 report §2.2): two RMSNorms, the 2h→h projection, one decoder layer
        (MoE when the model has experts) and the shared head's norm. Embedding and output head are
        shared with the main model and not counted again (the checkpoint stores copies of them, which
        is why Hugging Face lists 685B = 671B main + 14B MTP).
        """
        if not self.num_mtp_layers:
            return 0
        h = self.hidden_size
        block = self.params_moe_layer if self.is_moe else self.params_dense_layer
        return self.num_mtp_layers * (2 * h + 2 * h * h + block + h)

    @property
    def params_total(self) -> int:
        """All trainable parameters of the main model (MTP excluded)."""
        layers = self.num_dense_layers * self.params_dense_layer + self.num_moe_layers * self.params_moe_layer
        return self.params_embedding + layers + self.params_final_norm

    @property
    def params_active(self) -> int:
        """Parameters one token uses: all but the routed experts it is not sent to."""
        idle = self.num_experts - self.num_experts_per_token
        return self.params_total - self.num_moe_layers * idle * self.params_expert

    @property
    def params_non_embedding(self) -> int:
        return self.params_total - self.params_embedding

    # ------------------------------------------------------------------ FLOPs
    @property
    def matmul_params_per_token(self) -> int:
        """Weights a token multiplies through (see the module docstring): active layers + head.

        Biases, norms and the embedding lookup are excluded; the router, the top-k routed experts,
        the shared experts and the output head (tied or not) are included.
        """
        attention = self._attention_parts()[0]
        dense = attention + self._ffn_parts(self.intermediate_size, self.mlp_bias)[0]
        moe = (attention + self.params_router + self.num_experts_per_token * self.params_expert
               + self._shared_experts_parts()[0])
        head = self.vocab_size * self.hidden_size
        return self.num_dense_layers * dense + self.num_moe_layers * moe + head

    def attention_flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs of scores and weighted values, per token: 6·L·s·n_heads·(d_qk + d_v)."""
        _check_positive("seq_len", seq_len)
        return 6 * self.num_layers * seq_len * self.num_heads * (self.head_dim_qk + self.head_dim_v)

    def flops_per_token(self, seq_len: int) -> int:
        """Training (forward + backward) FLOPs per token at sequence length ``seq_len``, no recomputation.

        6·N_matmul + 6·L·s·n_heads·(d_qk + d_v); for GPT blocks Narayanan et al. 2021 Eq. 3 (factor 72).
        """
        return 6 * self.matmul_params_per_token + self.attention_flops_per_token(seq_len)

    def forward_flops_per_token(self, seq_len: int) -> int:
        """Forward-only FLOPs per token: one third of :meth:`flops_per_token`."""
        return self.flops_per_token(seq_len) // 3

    def to_dict(self, seq_len: int | None = None) -> dict[str, Any]:
        """Stable JSON record (the ``model show --json`` contract)."""
        record: dict[str, Any] = {
            "name": self.name,
            "model_type": self.model_type,
            "family": self.family,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim_qk": self.head_dim_qk,
            "head_dim_v": self.head_dim_v,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "num_experts": self.num_experts,
            "num_experts_per_token": self.num_experts_per_token,
            "num_shared_experts": self.num_shared_experts,
            "moe_intermediate_size": self.moe_intermediate_size,
            "first_k_dense": self.first_k_dense,
            "num_mtp_layers": self.num_mtp_layers,
            "params_total": self.params_total,
            "params_active": self.params_active,
            "params_embedding": self.params_embedding,
            "params_mtp": self.params_mtp,
            "source": self.source,
        }
        if seq_len is not None:
            record["seq_len"] = seq_len
            record["flops_per_token"] = self.flops_per_token(seq_len)
        return record



# ---------------------------------------------------------------------- reading configs
def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SpecError(f"{name} must be a positive integer, got {value!r}")


class _Fields:
    """Typed, named access to a config dict: every problem names the field and the file.

    A missing key takes the ``transformers`` class default for this ``model_type`` (``_HF_DEFAULTS``)
    when there is one, else ``default``; an explicit ``null`` takes ``default`` (what ``None`` means).
    """

    def __init__(self, config: Mapping[str, Any], where: str, model_type: str) -> None:
        self.config, self.where = config, where
        self.class_defaults = _HF_DEFAULTS.get(model_type, {})

    def int(self, key: str, default: int | None = None, *, minimum: int = 1) -> int:
        if key not in self.config and key in self.class_defaults:
            return self.class_defaults[key]
        value = self.config.get(key)
        if value is None:
            if default is None:
                raise SpecError(f"{self.where}: required field {key!r} is missing; copy it from the "
                                f"model's config.json")
            return default
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{self.where}: field {key!r} must be an integer, got {value!r}")
        if not minimum <= value <= _MAX_DIM:
            raise SpecError(f"{self.where}: field {key!r} = {value} is out of range [{minimum}, {_MAX_DIM}]")
        return value

    def bool(self, key: str, default: bool) -> bool:
        value = self.config.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise SpecError(f"{self.where}: field {key!r} must be true or false, got {value!r}")
        return value


def from_hf_config(config: Mapping[str, Any], *, name: str = "config", source: str = "") -> ModelSpec:
    """Build a :class:`ModelSpec` from a parsed Hugging Face ``config.json`` mapping."""
    if not isinstance(config, Mapping):
        raise SpecError(f"{name}: a config must be a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise SpecError(f"{name}: required field 'model_type' is missing or not a string{_model_type_hint(config)}")
    family = MODEL_TYPES.get(model_type)
    if family is None:
        raise SpecError(f"{name}: unsupported model_type {model_type!r}{_text_config_hint(config)}; "
                        f"supported: {', '.join(sorted(MODEL_TYPES))}")
    fields = _Fields(config, name, model_type)
    clean = {k: v for k, v in config.items() if not str(k).startswith("_")}
    common: dict[str, Any] = dict(name=name, model_type=model_type, family=family, hf_config=clean, source=source)
    builder = {"gpt2": _gpt2, "llama": _llama, "moe": _llama, "mla": _mla}[family]
    spec = builder(fields, common)
    _validate(spec, name)
    return spec


def _model_type_hint(config: Mapping[str, Any]) -> str:
    """For a config without ``model_type``: the one its ``architectures`` names (``LlamaForCausalLM`` →
    ``llama``), so the message says which line to add."""
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    if arch is None:
        return _text_config_hint(config)
    prefix = re.split("For|LMHead", arch)[0].lower()  # LlamaForCausalLM, GPT2LMHeadModel, DeepseekV3For...
    guess = next((t for t in MODEL_TYPES if t.replace("_", "") == prefix), None)
    fix = f'add "model_type": "{guess}"' if guess else "it is not one batchpilot supports either"
    return f" (architectures names {arch!r}: {fix})"


def _text_config_hint(config: Mapping[str, Any]) -> str:
    """For a multimodal wrapper (LLaVA, Llama 4, Qwen2-VL, Gemma 3): the language model sits in
    ``text_config``; it is not read silently, since the vision tower's parameters would go uncounted."""
    text = config.get("text_config")
    if not isinstance(text, Mapping):
        return ""
    inner = text.get("model_type")
    if inner in MODEL_TYPES:
        return (f" (a multimodal wrapper; its language model in 'text_config' is a supported {inner!r}: save "
                f"'text_config' as a config.json of its own to plan the language model alone)")
    return f" (a multimodal wrapper whose language model in 'text_config' is {inner!r}, not supported either)"


def _gpt2(f: _Fields, common: dict[str, Any]) -> ModelSpec:
    h, nh = f.int("n_embd"), f.int("n_head")
    return ModelSpec(
        **common, num_layers=f.int("n_layer"), hidden_size=h, num_heads=nh, num_kv_heads=nh,
        head_dim_qk=h // nh, head_dim_v=h // nh, intermediate_size=f.int("n_inner", 4 * h),
        vocab_size=f.int("vocab_size"), max_position_embeddings=f.int("n_positions"),
        tie_word_embeddings=f.bool("tie_word_embeddings", True), mlp_kind="gelu", norm_kind="layernorm",
        qkv_bias=True, o_bias=True, mlp_bias=True, learned_positions=True,
    )


def _llama(f: _Fields, common: dict[str, Any]) -> ModelSpec:
    """Llama, Mistral, Qwen2 and Mixtral: only Llama reads ``attention_bias``/``mlp_bias``."""
    h, nh = f.int("hidden_size"), f.int("num_attention_heads")
    head_dim = f.int("head_dim", h // nh)
    model_type = common["model_type"]
    is_llama = model_type == "llama"
    attention_bias = is_llama and f.bool("attention_bias", False)
    moe: dict[str, Any] = {}
    if common["family"] == "moe":
        moe = dict(
            num_experts=f.int("num_local_experts"), num_experts_per_token=f.int("num_experts_per_tok"),
            moe_intermediate_size=f.int("intermediate_size"),
        )
    return ModelSpec(
        **common, num_layers=f.int("num_hidden_layers"), hidden_size=h, num_heads=nh,
        num_kv_heads=f.int("num_key_value_heads", nh), head_dim_qk=head_dim, head_dim_v=head_dim,
        intermediate_size=f.int("intermediate_size"), vocab_size=f.int("vocab_size"),
        max_position_embeddings=f.int("max_position_embeddings"),
        tie_word_embeddings=f.bool("tie_word_embeddings", False), mlp_kind="swiglu", norm_kind="rmsnorm",
        qkv_bias=attention_bias or model_type == "qwen2", o_bias=attention_bias,
        mlp_bias=is_llama and f.bool("mlp_bias", False), **moe,
    )


def _mla(f: _Fields, common: dict[str, Any]) -> ModelSpec:
    """DeepSeek-V2/V3: every layer from ``first_k_dense_replace`` on is MoE (``moe_layer_freq`` 1)."""
    nh = f.int("num_attention_heads")
    nope, rope = f.int("qk_nope_head_dim"), f.int("qk_rope_head_dim")
    if f.int("moe_layer_freq", 1) != 1:
        raise SpecError(f"{f.where}: moe_layer_freq other than 1 is not supported (transformers ignores it)")
    is_v2 = common["model_type"] == "deepseek_v2"
    attention_bias = f.bool("attention_bias", False)
    return ModelSpec(
        **common, num_layers=f.int("num_hidden_layers"), hidden_size=f.int("hidden_size"), num_heads=nh,
        num_kv_heads=nh, head_dim_qk=nope + rope, head_dim_v=f.int("v_head_dim"),
        intermediate_size=f.int("intermediate_size"), vocab_size=f.int("vocab_size"),
        max_position_embeddings=f.int("max_position_embeddings"),
        tie_word_embeddings=f.bool("tie_word_embeddings", False), mlp_kind="swiglu", norm_kind="rmsnorm",
        qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=is_v2 and f.bool("mlp_bias", False),
        q_lora_rank=f.int("q_lora_rank", 0, minimum=0), kv_lora_rank=f.int("kv_lora_rank"),
        qk_rope_head_dim=rope, num_mtp_layers=f.int("num_nextn_predict_layers", 0, minimum=0),
        num_experts=f.int("n_routed_experts"), num_experts_per_token=f.int("num_experts_per_tok"),
        num_shared_experts=f.int("n_shared_experts", 0, minimum=0),
        moe_intermediate_size=f.int("moe_intermediate_size"),
        first_k_dense=f.int("first_k_dense_replace", 0, minimum=0),
    )


def _validate(spec: ModelSpec, where: str) -> None:
    explicit_head_dim = spec.family in ("llama", "moe") and spec.hf_config.get("head_dim") is not None
    if spec.family != "mla" and spec.hidden_size % spec.num_heads and not explicit_head_dim:
        raise SpecError(
            f"{where}: hidden_size {spec.hidden_size} is not divisible by num_attention_heads {spec.num_heads}"
        )
    if spec.num_heads % spec.num_kv_heads:
        raise SpecError(
            f"{where}: num_attention_heads {spec.num_heads} is not a multiple of "
            f"num_key_value_heads {spec.num_kv_heads}"
        )
    if spec.is_moe and not 0 < spec.num_experts_per_token <= spec.num_experts:
        raise SpecError(
            f"{where}: num_experts_per_tok {spec.num_experts_per_token} must be in [1, {spec.num_experts}]"
        )
    if spec.first_k_dense > spec.num_layers:
        raise SpecError(f"{where}: first_k_dense_replace {spec.first_k_dense} exceeds {spec.num_layers} layers")


# ---------------------------------------------------------------------- presets and files
PRESETS_PACKAGE = "batchpilot.data.models"


def _preset_dir() -> Path:
    return Path(str(resources.files("batchpilot") / "data" / "models"))


def preset_names() -> list[str]:
    """Names of the shipped model presets, sorted."""
    return sorted(p.stem for p in _preset_dir().glob("*.json"))


_HUB_URL = re.compile(r"https://huggingface\.co/([\w.-]+)/([\w.-]+)/")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
"""A Hugging Face hub id: ``org/name`` (``meta-llama/Meta-Llama-3-8B``)."""


@functools.lru_cache(maxsize=1)
def preset_aliases() -> Mapping[str, str]:
    """Other names of the presets: the hub id each was copied from (its ``_source_url``) and that id's model
    name alone (``meta-llama/Meta-Llama-3-8B``, ``Meta-Llama-3-8B`` → ``llama-3-8b``), and any ``_aliases``."""
    aliases: dict[str, str] = {}
    for name in preset_names():
        config = read_json_object(_preset_dir() / f"{name}.json", "model preset")
        hub = _HUB_URL.match(str(config.get("_source_url", "")))
        spellings = [*(f"{hub[1]}/{hub[2]}", hub[2])] if hub else []
        aliases.update((str(alias), name) for alias in [*spellings, *config.get("_aliases", [])])
    return MappingProxyType(aliases)


def preset_path(name: str) -> Path:
    """Path of a shipped preset's config file. Names match as :mod:`batchpilot.names` says (case, separators, hub
    ids, whole-word prefixes: ``Llama-3-8B`` is ``llama-3-8b``); a prefix of several is an error listing them."""
    return _preset_dir() / f"{resolve('model preset', name, preset_names(), preset_aliases())}.json"


def hub_cache_dir() -> Path:
    """The local Hugging Face hub cache, as ``huggingface_hub`` (2.4.0, ``constants.py``) finds it:
    ``$HF_HUB_CACHE``, else ``$HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``${XDG_CACHE_HOME:-~/.cache}/huggingface/hub``."""
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not hub:
        home = os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
        hub = os.path.join(home, "hub")
    return Path(os.path.expanduser(os.path.expandvars(hub)))


def cached_hub_config(repo_id: str) -> Path | None:
    """The ``config.json`` of ``repo_id`` in the local hub cache, if there is one (nothing is downloaded).

    The cache keeps ``models--ORG--NAME/snapshots/REVISION/config.json`` and ``refs/main`` naming the revision
    of the main branch; that one is taken, else the newest snapshot holding a config.
    """
    repo = hub_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    if not path_is(repo, "is_dir"):
        return None
    main = repo / "refs" / "main"
    if path_is(main, "is_file"):
        revision = main.read_text(encoding="utf-8", errors="replace").strip()
        if re.fullmatch(r"[\w.-]+", revision) and path_is(config := repo / "snapshots" / revision / "config.json",
                                                           "is_file"):
            return config
    configs = [c for c in (repo / "snapshots").glob("*/config.json") if path_is(c, "is_file")]
    return max(configs, key=lambda c: c.stat().st_mtime) if configs else None


def _load_hub_id(repo_id: str) -> ModelSpec:
    """A hub id: its config in the local cache, else the preset copied from it, else a one-line explanation."""
    cached = cached_hub_config(repo_id)
    if cached is not None:
        return from_hf_config(read_json_object(cached, "model config"), name=repo_id, source=str(cached.resolve()))
    found = [target for alias, target in preset_aliases().items() if alias.lower() == repo_id.lower()]
    if found:
        return load_model(found[0])
    raise UnknownNameError(
        f"--model {repo_id!r} is not a file or directory here; as a Hugging Face hub id it is not in the local cache "
        f"({hub_cache_dir() / ('models--' + repo_id.replace('/', '--'))}) and no preset was copied from it. "
        f"batchpilot reads configs only, nothing is downloaded: pass the path of its config.json (or of a folder "
        f"holding one), fetch it into the cache yourself (huggingface-cli download {repo_id} config.json), or use "
        f"a preset (batchpilot model list)"
    )


def load_model(name_or_path: str | Path) -> ModelSpec:
    """A preset name (``llama-3-8b``, ``Llama-3-8B``), a ``config.json`` path, a directory holding one, or a
    Hugging Face hub id (``meta-llama/Meta-Llama-3-8B``) whose config is in the local hub cache or is a preset."""
    text = str(name_or_path)
    path = Path(text)
    if path_is(path, "is_dir"):
        path = path / "config.json"
    if path.suffix != ".json" and not path_is(path, "exists") and _HUB_ID.fullmatch(text.strip()):
        return _load_hub_id(text.strip())
    looks_like_path = path.suffix == ".json" or "/" in text or path_is(path, "exists")
    if not looks_like_path:
        path = preset_path(text)
        config = read_json_object(path, "model preset")
        return from_hf_config(config, name=path.stem, source=str(config.get("_source_url", "")))
    config = read_json_object(path, "model config")
    return from_hf_config(config, name=text, source=str(path.resolve()))
