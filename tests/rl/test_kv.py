"""KV cache per token (MHA, GQA, MLA) and vLLM's KV budget, against numbers computed by hand from configs."""

from __future__ import annotations

import pytest

from batchpilot.errors import InfeasibleError, SpecError
from batchpilot.rl.kv import (
    BLOCK_SIZE_TOKENS,
    NON_TORCH_BYTES,
    check_kv_holds_one_request,
    kv_bytes_per_token,
    rollout_memory,
)
from batchpilot.specs.model import load_model
from batchpilot.units import GIB


def test_gqa_llama_3_8b() -> None:
    # config.json: 32 layers, 8 key/value heads of 128; K and V in bf16: 2 · 8 · 128 · 2 B · 32 = 128 KiB.
    model = load_model("llama-3-8b")
    assert kv_bytes_per_token(model, tp=1) == 2 * 8 * 128 * 2 * 32 == 131_072
    assert kv_bytes_per_token(model, tp=4) == 2 * 2 * 128 * 2 * 32   # 2 KV heads per rank
    assert kv_bytes_per_token(model, tp=8) == 2 * 1 * 128 * 2 * 32
    assert kv_bytes_per_token(model, tp=16) == kv_bytes_per_token(model, tp=8)  # a KV head is replicated past 8


def test_mha_gpt2() -> None:
    # GPT-2: 12 layers, 12 heads of 64 (MHA: every head has its own K and V).
    assert kv_bytes_per_token(load_model("gpt2"), tp=1) == 2 * 12 * 64 * 2 * 12


def test_mla_deepseek_v3_is_the_latent_and_not_split_by_tp() -> None:
    # DeepSeek-V3 config: kv_lora_rank 512, qk_rope_head_dim 64, 61 layers: (512 + 64) · 2 B · 61.
    model = load_model("deepseek-v3")
    assert kv_bytes_per_token(model, tp=1) == (512 + 64) * 2 * 61 == 70_272
    assert kv_bytes_per_token(model, tp=8) == 70_272
    # The same model as MHA would cache 128 heads × (192 + 128) per layer: 71× more.
    mha = 128 * (192 + 128) * 2 * 61
    assert mha // 70_272 == 71


def test_rollout_budget_is_vllms_formula() -> None:
    model = load_model("qwen2.5-7b")
    mem = rollout_memory(model, memory_bytes=80 * GIB, tp=1, gpu_memory_utilization=0.5, max_num_batched_tokens=8192)
    assert mem.requested_bytes == 40 * GIB
    assert mem.weights_bytes == model.params_total * 2
    assert mem.kv_cache_bytes == pytest.approx(40 * GIB - mem.weights_bytes - mem.activation_peak_bytes - NON_TORCH_BYTES)
    # Qwen2.5-7B: 28 layers, 4 KV heads of 128 → 57,344 B per token.
    assert mem.kv_bytes_per_token == 2 * 4 * 128 * 2 * 28 == 57_344
    assert mem.num_blocks == int(mem.kv_cache_bytes // (57_344 * BLOCK_SIZE_TOKENS))


def test_one_request_must_fit_or_vllm_refuses() -> None:
    model = load_model("qwen2.5-7b")
    mem = rollout_memory(model, memory_bytes=80 * GIB, tp=1, gpu_memory_utilization=0.3, max_num_batched_tokens=8192)
    check_kv_holds_one_request(mem, 4096, "x")
    with pytest.raises(InfeasibleError, match="max_model_len"):
        check_kv_holds_one_request(mem, mem.kv_capacity_tokens + 1, "x")


def test_tp_must_divide_heads() -> None:
    with pytest.raises(SpecError, match="must divide the 28 attention heads"):
        kv_bytes_per_token(load_model("qwen2.5-7b"), tp=8)
