"""Model states per GPU: weights, gradients and optimizer states by engine × precision × optimizer, sharded
per ZeRO stage (Rajbhandari et al. 2020, "ZeRO", §3.1, §5, Figure 1, Table 1).

    >>> from batchpilot.specs.settings import RunSettings
    >>> s = RunSettings(engine="deepspeed", precision="bf16", zero_stage=3)
    >>> model_state_bytes(s, params=7.5e9, dp=64).total_bytes / 1e9   # the paper's Figure 1: 1.9 GB
    1.875

With ``engine="deepspeed"`` and 16-bit mixed precision this reproduces the paper's (2 + 2 + K)·Ψ with
K = 12 exactly; the ZeRO-3 all-gather buffers and communication buckets are overhead, not model state,
as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from batchpilot.estimate.dtypes import ACTIVATION_BYTES
from batchpilot.specs.settings import RunSettings

#: Bytes per parameter of optimizer *state* (excluding any fp32 master copy), kept in fp32 unless noted.
#: AdamW: m and v (Kingma & Ba 2015). 8-bit Adam: two 1-byte states plus block-wise scales
#: (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization": ≈ 2 bytes/param).
#: SGD with momentum: one buffer. Adafactor (Shazeer & Stern 2018) keeps factored row/column second
#: moments, O(rows + cols) per matrix: counted as 0 per parameter (< 1 % for matrices wider than 200).
OPTIMIZER_STATE_BYTES: dict[str, int] = {"adamw": 8, "adamw-8bit": 2, "sgd-momentum": 4, "adafactor": 0}

#: Transient bytes per parameter at the peak of a ``foreach`` optimizer step (the CUDA default of
#: ``torch.optim``): ``_multi_tensor_adamw`` allocates ``torch._foreach_sqrt(exp_avg_sqs)``, one fp32
#: state-sized list, and updates everything else in place — measured 4 bytes/param on torch 2.13
#: (benchmarks/cpu_step.py, tests/estimate/test_memory_crosscheck.py). SGD with momentum updates in
#: place. Adafactor's factored update: one parameter-sized temporary (not measured). The per-tensor loop
#: (``foreach=False``, torch's CPU default) instead holds two temporaries of the largest parameter tensor
#: (``exp_avg_sq.sqrt() / bias_correction``): :data:`LOOP_STEP_TRANSIENT_TENSORS`. Fused kernels
#: (``fused=True``, DeepSpeed FusedAdam, Megatron's optimizer) update in place: 0.
OPTIMIZER_STEP_TRANSIENT_BYTES: dict[str, int] = {"adamw": 4, "adamw-8bit": 0, "sgd-momentum": 0, "adafactor": 4}

#: fp32 temporaries of the largest parameter tensor alive in a per-tensor-loop optimizer step (AdamW:
#: ``sqrt(v)`` and its bias-corrected quotient; measured: 25.2 MB = 2 × the 12.6 MB head of
#: ``tiny-llama-15m``).
LOOP_STEP_TRANSIENT_TENSORS: dict[str, int] = {"adamw": 2, "adamw-8bit": 0, "sgd-momentum": 0, "adafactor": 1}

Engine = Literal["torch", "fsdp2", "deepspeed", "megatron"]


@dataclass(frozen=True, kw_only=True, slots=True)
class ParamBytes:
    """Model-state bytes per parameter before any sharding (one row of :data:`PARAM_BYTES`)."""

    weights: int
    """The parameters as the engine stores them for forward/backward."""
    gradients: int
    """Gradient (accumulation) buffer."""
    master: int
    """Separate fp32 master copy of the weights (mixed precision in DeepSpeed/Megatron); 0 when the
    stored weights already are fp32."""
    optimizer_state: int
    """Optimizer states proper (Adam m and v, momentum, ...)."""

    @property
    def optimizer(self) -> int:
        """ZeRO's K: master copy plus optimizer states."""
        return self.master + self.optimizer_state

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer


def _param_bytes(engine: str, precision: str, optimizer: str, param_dtype: str = "fp32") -> ParamBytes:
    """One cell of the engine × precision × optimizer table (sources per engine in :data:`PARAM_BYTES`)."""
    state = OPTIMIZER_STATE_BYTES[optimizer]
    if param_dtype == "bf16":
        # pure bf16 training (torchtune ``dtype: bf16``; torchtitan ``training.dtype = "bfloat16"``): the
        # parameters, their gradients and the optimizer states (created ``zeros_like(param)``) are bf16.
        return ParamBytes(weights=2, gradients=2, master=0, optimizer_state=state // 2)
    if precision == "fp32":
        return ParamBytes(weights=4, gradients=4, master=0, optimizer_state=state)
    if engine in ("torch", "fsdp2"):
        # autocast / FSDP2 MixedPrecisionPolicy: fp32 (sharded) parameters and fp32 gradients; the
        # 16-bit compute copies are transient and counted separately.
        return ParamBytes(weights=4, gradients=4, master=0, optimizer_state=state)
    if engine == "megatron":
        # Megatron-LM keeps fp32 "main" gradients (Korthikanti/Narayanan: 2 + 4 + 12).
        return ParamBytes(weights=2, gradients=4, master=4, optimizer_state=state)
    # DeepSpeed mixed precision (ZeRO paper §3.1): 16-bit weights and gradients, fp32 master + states.
    return ParamBytes(weights=2, gradients=2, master=4, optimizer_state=state)


#: The explicit bytes-per-parameter table, keyed by (engine, precision, optimizer). Rows for AdamW:
#: ``deepspeed`` bf16/fp16/fp8 2 + 2 + 12 (ZeRO paper §3.1, K = 12); ``megatron`` 2 + 4 + 12 (fp32 main
#: gradients; with the distributed optimizer, ``--zero 1``, 6 + 12/DP); ``torch``/``fsdp2`` mixed precision
#: 4 + 4 + 8 (fp32 parameters and gradients under autocast); every engine in fp32 4 + 4 + 8.
PARAM_BYTES: dict[tuple[str, str, str], ParamBytes] = {
    (e, p, o): _param_bytes(e, p, o)
    for e in ("torch", "fsdp2", "deepspeed", "megatron")
    for p in ("fp32", "bf16", "fp16", "fp8")
    for o in OPTIMIZER_STATE_BYTES
}

#: Pure bf16 training (``--param-dtype bf16``), keyed by optimizer: 2 + 2 + (AdamW m, v in bf16) 4.
PURE_BF16_PARAM_BYTES: dict[str, ParamBytes] = {o: _param_bytes("torch", "bf16", o, "bf16")
                                                for o in OPTIMIZER_STATE_BYTES}

#: Transformer Engine's cached fp8 weight per local linear weight (``TransformerEngineBaseModule.
#: get_weight_workspace``, ``transformer_engine/pytorch/module/base.py`` @ ``d0067d0d``): kept across
#: micro-batches when Megatron passes ``is_first_microbatch``; on Hopper row-wise and column-wise
#: (transposed) fp8 data, 2 bytes per parameter; MXFP8 adds one 1-byte scale per 32 elements each.
TE_FP8_WEIGHT_CACHE_BYTES: dict[str, float] = {"delayed": 2.0, "tensorwise": 2.0, "blockwise": 2.0 * (1 + 4 / 128),
                                               "rowwise": 2.0, "mxfp8": 2.0 * (1 + 1 / 32)}


def bytes_per_param(settings: RunSettings) -> ParamBytes:
    """The :data:`PARAM_BYTES` row for these settings (:data:`PURE_BF16_PARAM_BYTES` for ``--param-dtype bf16``)."""
    if settings.param_dtype == "bf16":
        return PURE_BF16_PARAM_BYTES[settings.optimizer]
    return PARAM_BYTES[(settings.engine, settings.precision, settings.optimizer)]


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelStates:
    """Model-state bytes on one GPU (Rajbhandari et al. 2020's "model states")."""

    weights_bytes: float
    gradients_bytes: float
    optimizer_bytes: float
    """Optimizer states including fp32 master weights (ZeRO's K·Ψ); 0 when offloaded to CPU."""
    compute_copies_bytes: float = 0.0
    """Transient 16-bit weight copies alive during forward/backward (autocast's cast cache; FSDP's
    unsharded parameters between forward and backward when not resharded): not model state."""

    @property
    def total_bytes(self) -> float:
        return self.weights_bytes + self.gradients_bytes + self.optimizer_bytes


def model_state_bytes(settings: RunSettings, *, params: float, dp: int, expert_params: float = 0.0,
                      matmul_params: float | None = None, shard: int | None = None) -> ModelStates:
    """Weights, gradients and optimizer states of ``params`` dense (+ ``expert_params`` routed-expert)
    parameters held by one GPU, sharded per ZeRO stage (Rajbhandari et al. 2020 §5.1–5.3).

    Stage 1 divides optimizer states by the shard group (``dp``, or ``shard`` for hybrid sharding),
    stage 2 also gradients, stage 3 also weights: 16-bit DeepSpeed AdamW gives (2 + 2 + 12)·Ψ,
    4Ψ + 12Ψ/N, 2Ψ + 14Ψ/N and 16Ψ/N (the paper's Figure 1 and Table 1). Routed experts are sharded over
    the expert data-parallel group ``shard / ep``. Megatron's distributed optimizer (``--zero`` ≥ 1)
    shards only optimizer states (6 + 12/DP bytes/param). FSDP2 (``engine="fsdp2"``) always shards its
    fp32 parameters; at ``--zero`` 1/2 (``reshard_after_forward=False``) it keeps the unsharded
    compute-dtype copies between forward and backward (``compute_copies_bytes``).
    """
    pb = bytes_per_param(settings)
    group = max(1, dp if shard is None else shard)
    expert_group = max(1, group // settings.ep)
    zero = settings.zero_stage
    megatron = settings.engine == "megatron"

    def per_gpu(bytes_each: float, sharded: bool) -> float:
        if not sharded:
            return bytes_each * (params + expert_params)
        return bytes_each * (params / group + expert_params / expert_group)

    fsdp_unsharded = settings.engine == "fsdp2" and zero in (1, 2)
    copies = 0.0
    if settings.engine == "megatron" and settings.precision == "fp8":
        # TE's cached fp8 weights (row- and column-wise) of every local matmul weight
        matmul = params + expert_params if matmul_params is None else matmul_params
        copies = TE_FP8_WEIGHT_CACHE_BYTES[settings.resolved_fp8_recipe or "delayed"] * matmul
    elif fsdp_unsharded:
        # fully_shard(reshard_after_forward=False): parameters stay sharded in fp32, and the unsharded
        # compute-dtype copies all-gathered in forward are kept until backward has used them.
        copies = ACTIVATION_BYTES[settings.precision] * (params + expert_params)
    elif settings.engine in ("torch", "fsdp2") and settings.precision != "fp32" and zero < 3 \
            and settings.param_dtype == "fp32":
        # autocast's cast cache: 16-bit copies of the matmul weights, saved for backward.
        matmul = params + expert_params if matmul_params is None else matmul_params
        copies = ACTIVATION_BYTES[settings.precision] * matmul
    return ModelStates(
        weights_bytes=per_gpu(pb.weights, (zero >= 3 or fsdp_unsharded) and not megatron),
        gradients_bytes=per_gpu(pb.gradients, zero >= 2 and not megatron),
        optimizer_bytes=0.0 if settings.offload else per_gpu(pb.optimizer, zero >= 1),
        compute_copies_bytes=copies,
    )
