"""The rollout engine's memory as vLLM computes it: weights ÷ TP, KV cache per token, the KV budget.

Examples (hand-checkable from the configs)::

    >>> from batchpilot.specs.model import load_model
    >>> kv_bytes_per_token(load_model("llama-3-8b"), tp=1)      # GQA: 2 · 8 kv heads · 128 · 2 B · 32 layers
    131072
    >>> kv_bytes_per_token(load_model("deepseek-v3"), tp=8)     # MLA latent: (512 + 64) · 2 B · 61 layers
    70272

KV cache per token and GPU (vLLM ``vllm/v1/kv_cache_interface.py`` at commit 001cabc1):

- MHA/GQA (``FullAttentionSpec.real_page_size_bytes``): ``block_size · num_kv_heads · (head_size +
  head_size_v) · dtype`` per layer and block, with ``num_kv_heads`` the heads on one tensor-parallel rank,
  ``max(1, kv_heads // tp)`` (vLLM replicates a KV head when TP exceeds the KV heads).
- MLA (``MLAAttentionSpec.real_page_size_bytes``): ``block_size · 1 · head_size · dtype`` with
  ``head_size = kv_lora_rank + qk_rope_head_dim`` — the compressed latent plus the shared RoPE key
  (DeepSeek-V2 §2.1.2), one "head", the same on every tensor-parallel rank (it is not split by TP).

The KV budget (vLLM ``vllm/v1/worker/gpu_worker.py`` ``Worker.init_device`` and
``determine_available_memory`` at commit 35d5cda1): ``requested = total_memory × gpu_memory_utilization``,
refused at start-up when more than the free memory (``Free memory on device … is less than desired GPU
memory utilization``); ``available_kv_cache_memory = requested − non_kv_cache_memory``, the weights plus
the activation peak of a profiling forward over ``max_num_batched_tokens`` tokens plus what non-torch
allocations grew by. The cache is cut into blocks of ``block_size`` tokens (16) for every layer.

Known error: vLLM *measures* the profiling peak; :func:`profile_activation_bytes` estimates it from the
shapes of one layer's working set and the sampler's logits (≈ ±50 % of a term that is a few GiB at most).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from batchpilot.errors import InfeasibleError, SpecError
from batchpilot.estimate.dtypes import DTYPE_BYTES
from batchpilot.specs.model import ModelSpec

BLOCK_SIZE_TOKENS = 16
"""vLLM's default KV block size for CUDA (``CacheConfig.block_size``)."""

NON_TORCH_BYTES = 256 * 2**20
"""What non-torch allocations grow by during vLLM's profiling run (cuBLAS/NCCL workspaces; no CUDA graphs
under ``enforce_eager``, verl's default): an assumption of the same order as the analytic model's
workspace term."""

ENGINE_CONTEXT_BYTES = 512 * 2**20
"""CUDA context of one process (the same default as :class:`batchpilot.estimate.overhead.OverheadModel`)."""


def kv_bytes_per_token(model: ModelSpec, *, tp: int, dtype: str = "bf16") -> int:
    """KV cache bytes one token occupies on one GPU of a tensor-parallel group of ``tp``, all layers."""
    _check_tp(model, tp)
    size = DTYPE_BYTES[dtype]
    if model.family == "mla":
        per_layer = (model.kv_lora_rank + model.qk_rope_head_dim) * size
    else:
        heads = max(1, model.num_kv_heads // tp)
        per_layer = heads * (model.head_dim_qk + model.head_dim_v) * size
    return per_layer * model.num_layers


def _check_tp(model: ModelSpec, tp: int) -> None:
    """vLLM's rule (``ModelConfig.verify_with_parallel_config``): the attention heads divide by TP."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise SpecError(f"--rollout-tp {tp!r} must be a positive integer")
    if model.num_heads % tp:
        near = [d for d in range(1, model.num_heads + 1) if model.num_heads % d == 0]
        best = sorted(near, key=lambda d: abs(d - tp))[:2]
        raise SpecError(f"rollout TP {tp} must divide the {model.num_heads} attention heads of {model.name} "
                        f"(vLLM: total_num_attention_heads % tensor_parallel_size == 0); use {' or '.join(map(str, sorted(best)))}")


def weight_bytes_per_gpu(model: ModelSpec, *, tp: int, dtype: str = "bf16") -> float:
    """Parameters ÷ TP in the rollout dtype (embedding, head and experts are all split by TP in vLLM)."""
    return model.params_total * DTYPE_BYTES[dtype] / tp


def profile_activation_bytes(model: ModelSpec, *, tp: int, max_num_batched_tokens: int, max_num_seqs: int) -> float:
    """Estimated peak of vLLM's profiling forward: one layer's working set for ``max_num_batched_tokens``
    tokens (residual in and out, QKV and attention output, the MLP's gate/up output and product, 16-bit)
    plus the sampler's fp32 logits and probabilities for ``min(max_num_seqs, max_num_batched_tokens)``
    sequences over the whole vocabulary (gathered on every rank)."""
    h = model.hidden_size
    qkv = (model.num_heads * model.head_dim_qk + 2 * model.num_kv_heads * model.head_dim_qk) / tp
    width = max(model.intermediate_size, model.moe_intermediate_size * max(1, model.num_experts_per_token)) / tp
    per_token = (2 * h + qkv + model.num_heads * model.head_dim_v / tp + 3 * width) * 2
    sampler = min(max_num_seqs, max_num_batched_tokens) * model.vocab_size * 4 * 2
    return per_token * max_num_batched_tokens + sampler


@dataclass(frozen=True, kw_only=True, slots=True)
class RolloutMemory:
    """One rollout GPU's memory under vLLM's budget."""

    total_bytes: float
    """The device's memory (the catalog's nominal capacity)."""
    gpu_memory_utilization: float
    requested_bytes: float
    """total × gpu_memory_utilization: everything vLLM may use."""
    weights_bytes: float
    activation_peak_bytes: float
    non_torch_bytes: float
    kv_cache_bytes: float
    """requested − weights − activation peak − non-torch."""
    kv_bytes_per_token: int
    num_blocks: int
    block_size: int = BLOCK_SIZE_TOKENS

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the cache holds: blocks × block size."""
        return self.num_blocks * self.block_size

    def to_dict(self) -> dict[str, Any]:
        return {"total_bytes": self.total_bytes, "gpu_memory_utilization": self.gpu_memory_utilization,
                "requested_bytes": self.requested_bytes, "weights_bytes": self.weights_bytes,
                "activation_peak_bytes": self.activation_peak_bytes, "non_torch_bytes": self.non_torch_bytes,
                "kv_cache_bytes": self.kv_cache_bytes, "kv_bytes_per_token": self.kv_bytes_per_token,
                "num_blocks": self.num_blocks, "block_size": self.block_size,
                "kv_capacity_tokens": self.kv_capacity_tokens}


def checkpoint_weight_dtype(model: ModelSpec) -> str:
    """The dtype vLLM loads the weights in: ``fp8`` for checkpoints quantised to fp8 (DeepSeek-V3's
    ``quantization_config.quant_method``), else ``bf16``. The KV cache stays 16-bit (``kv_cache_dtype`` auto)."""
    quant = model.hf_config.get("quantization_config")
    return "fp8" if isinstance(quant, dict) and quant.get("quant_method") == "fp8" else "bf16"


def rollout_memory(model: ModelSpec, *, memory_bytes: int, tp: int, gpu_memory_utilization: float,
                   max_num_batched_tokens: int, max_num_seqs: int = 1024, weight_dtype: str = "bf16") -> RolloutMemory:
    """vLLM's KV budget on one GPU of a ``tp``-way engine (module docstring); no blocks when it is negative."""
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise SpecError(f"--gpu-memory-utilization {gpu_memory_utilization!r} must be in (0, 1] (vLLM's rule)")
    requested = memory_bytes * gpu_memory_utilization
    weights = weight_bytes_per_gpu(model, tp=tp, dtype=weight_dtype)
    act = profile_activation_bytes(model, tp=tp, max_num_batched_tokens=max_num_batched_tokens,
                                   max_num_seqs=max_num_seqs)
    kv = requested - weights - act - NON_TORCH_BYTES
    per_token = kv_bytes_per_token(model, tp=tp)
    blocks = max(0, int(kv // (per_token * BLOCK_SIZE_TOKENS)))
    return RolloutMemory(total_bytes=memory_bytes, gpu_memory_utilization=gpu_memory_utilization,
                         requested_bytes=requested, weights_bytes=weights, activation_peak_bytes=act,
                         non_torch_bytes=NON_TORCH_BYTES, kv_cache_bytes=kv, kv_bytes_per_token=per_token,
                         num_blocks=blocks)


def check_kv_holds_one_request(mem: RolloutMemory, max_model_len: int, where: str) -> None:
    """vLLM refuses to start when the cache cannot hold one request of ``max_model_len`` tokens
    (``vllm/v1/core/kv_cache_utils.py`` ``check_enough_kv_cache_memory``: "To serve at least one request with
    the models's max seq len …")."""
    need = -(-max_model_len // mem.block_size) * mem.block_size
    if mem.kv_capacity_tokens < need:
        raise InfeasibleError(
            f"{where}: the KV cache holds {mem.kv_capacity_tokens:,} tokens ({mem.kv_cache_bytes / 2**30:.2f} GiB at "
            f"{mem.kv_bytes_per_token:,} B/token) but one request of max_model_len {max_model_len:,} needs {need:,} "
            f"(vLLM refuses to start); raise the rollout TP or gpu_memory_utilization, or shorten the responses")
