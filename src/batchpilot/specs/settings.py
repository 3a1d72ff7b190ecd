"""Run settings: how a model is trained, as far as memory and step time depend on it.

One frozen, validated dataclass shared by ``memory``, ``plan``, ``probe`` and ``tune``. The CLI flags
map one-to-one: ``--precision --optimizer --engine --zero --tp --pp --ep --sp --recompute --attention
--offload``. Validation against a *model* (tp divides heads, pp ≤ layers, ...) is
:func:`validate_for_model`; against a cluster, the planner's job.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

from batchpilot.errors import SpecError

if TYPE_CHECKING:
    from batchpilot.specs.model import ModelSpec

Precision = Literal["fp32", "bf16", "fp16", "fp8"]
Optimizer = Literal["adamw", "adamw-8bit", "sgd-momentum", "adafactor"]
Engine = Literal["torch", "fsdp2", "deepspeed", "megatron"]
Recompute = Literal["none", "selective", "full"]
Attention = Literal["eager", "flash"]

PRECISIONS: tuple[str, ...] = get_args(Precision)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
ENGINES: tuple[str, ...] = get_args(Engine)
RECOMPUTES: tuple[str, ...] = get_args(Recompute)
ATTENTIONS: tuple[str, ...] = get_args(Attention)


@dataclass(frozen=True, kw_only=True, slots=True)
class RunSettings:
    """Training settings that change memory and step time."""

    precision: Precision = "bf16"
    """Compute precision. ``fp32``: no autocast. ``bf16``/``fp16``: mixed precision (fp16 adds a loss
    scaler). ``fp8``: fp8 matmuls (Transformer-Engine style) with bf16 weights/activations elsewhere."""
    optimizer: Optimizer = "adamw"
    engine: Engine = "torch"
    """Whose mixed-precision bookkeeping to model: ``torch`` autocast keeps fp32 weights and grads;
    ``fsdp2`` (MixedPrecisionPolicy: fp32 sharded params, bf16 unsharded compute copies);
    ``deepspeed`` 2 + 2 + 12 bytes/param; ``megatron`` fp32 main grads (2 + 4 + 12)."""
    zero_stage: int = 0
    """0 plain data parallel; 1 optimizer states sharded; 2 + gradients; 3 + parameters (FSDP full
    shard). For ``megatron``, ≥ 1 means its distributed optimizer."""
    hybrid_shard: bool = False
    """Shard within a node and replicate across nodes (FSDP HYBRID_SHARD / ZeRO++ hpZ)."""
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size (stages)."""
    vpp: int = 1
    """Virtual pipeline stages per pipeline rank: the interleaved 1F1B schedule (Narayanan et al. 2021
    §2.2.2; Megatron ``--num-virtual-stages-per-pipeline-rank``) splits each rank's layers into ``vpp``
    chunks, dividing the pipeline bubble by ``vpp`` at the price of ``vpp``× the stage-to-stage sends and
    a little more first-stage activation memory. 1 is plain 1F1B; > 1 needs ``pp`` > 1 and an
    accumulation that is a multiple of ``pp`` (:func:`check_interleaving`)."""
    ep: int = 1
    """Expert-parallel size (MoE only): routed experts are split over ``ep`` data-parallel ranks."""
    sp: bool = False
    """Megatron-style sequence parallelism over the tensor-parallel group (needs ``tp`` > 1 to matter)."""
    recompute: Recompute = "none"
    """Activation recomputation: ``selective`` recomputes the attention core (Korthikanti et al. 2022),
    ``full`` keeps only each layer's input."""
    attention: Attention = "flash"
    """``eager`` materialises the s×s score matrix; ``flash`` (FlashAttention / SDPA) does not."""
    offload: bool = False
    """Optimizer states (and fp32 master weights) live in CPU memory (ZeRO-Offload)."""

    def __post_init__(self) -> None:
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("engine", self.engine, ENGINES)
        _check_choice("recompute", self.recompute, RECOMPUTES)
        _check_choice("attention", self.attention, ATTENTIONS)
        if isinstance(self.zero_stage, bool) or self.zero_stage not in (0, 1, 2, 3):
            raise SpecError(f"--zero {self.zero_stage!r} is not a ZeRO stage; use 0, 1, 2 or 3")
        for name in ("tp", "pp", "vpp", "ep"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError(f"--{name} {value!r} must be a positive integer (1 disables it)")
        if self.vpp > 1 and self.pp == 1:
            raise SpecError(f"--vpp {self.vpp} interleaves pipeline stages and needs --pp > 1; use --vpp 1 without a pipeline")
        if self.offload and self.zero_stage == 0 and self.engine in ("deepspeed", "fsdp2"):
            raise SpecError("--offload needs --zero 1, 2 or 3 with the deepspeed/fsdp2 engines (ZeRO-Offload)")

    @property
    def model_parallel_size(self) -> int:
        """GPUs that hold one model replica: tp × pp (experts are spread over data-parallel ranks)."""
        return self.tp * self.pp

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SpecError(f"--{name.replace('_', '-')} {value!r} is not one of: {', '.join(choices)}")


def validate_for_model(settings: RunSettings, model: ModelSpec) -> None:
    """Raise a one-line :class:`SpecError` when the parallel layout cannot split this model."""
    if model.num_heads % settings.tp:
        raise SpecError(
            f"--tp {settings.tp} does not divide the {model.num_heads} attention heads of {model.name}; "
            f"use a divisor of {model.num_heads}"
        )
    if model.family != "mla" and settings.tp > model.num_kv_heads and settings.tp % model.num_kv_heads:
        raise SpecError(
            f"--tp {settings.tp} must divide or be a multiple of the {model.num_kv_heads} key/value heads "
            f"of {model.name}; use a divisor of {model.num_kv_heads}"
        )
    if settings.pp > model.num_layers:
        raise SpecError(
            f"--pp {settings.pp} exceeds the {model.num_layers} layers of {model.name}; use --pp ≤ {model.num_layers}"
        )
    layers_per_stage = -(-model.num_layers // settings.pp)
    if settings.vpp > layers_per_stage:
        raise SpecError(
            f"--vpp {settings.vpp} exceeds the {layers_per_stage} layers per pipeline stage of {model.name} at --pp "
            f"{settings.pp} (each virtual stage needs a layer); use --vpp ≤ {layers_per_stage}"
        )
    if settings.ep > 1 and not model.is_moe:
        raise SpecError(f"--ep {settings.ep} needs a mixture-of-experts model; {model.name} is dense (use --ep 1)")
    if model.is_moe and model.num_experts % settings.ep:
        raise SpecError(
            f"--ep {settings.ep} does not divide the {model.num_experts} experts of {model.name}; "
            f"use a divisor of {model.num_experts}"
        )


def check_interleaving(settings: RunSettings, grad_accum: int) -> None:
    """The interleaved schedule needs the micro-batches per step to be a multiple of the pipeline stages
    (Megatron ``schedules.py``: micro-batches run in groups of ``pp`` per virtual stage, and a partial last
    group is refused as a dependency bubble)."""
    if settings.vpp > 1 and grad_accum % settings.pp:
        raise SpecError(
            f"--vpp {settings.vpp} (interleaved pipeline) needs an accumulation that is a multiple of --pp "
            f"{settings.pp}, got {grad_accum}; use --grad-accum {(grad_accum // settings.pp + 1) * settings.pp} or --vpp 1"
        )
