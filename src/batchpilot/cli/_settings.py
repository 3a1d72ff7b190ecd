"""The run-settings flags (``--precision --optimizer --engine --zero … --offload``, and the memory settings
``--cp --recompute-every --compile --fp8-recipe --fp8-all-gather --reshard-after-forward --loss --loss-chunks
--param-dtype``) — one definition.

``memory`` and ``plan`` model any of them; ``probe``, ``train`` and ``tune`` run real steps on one device
and offer only those they honour (no flag a command would refuse or ignore). Use the ``Annotated``
aliases as parameter types and :data:`DEFAULTS` for the defaults, then build the settings with
:func:`settings_from_options`::

    @handle_errors
    def memory(..., precision: PrecisionOpt = DEFAULTS.precision, zero: ZeroOpt = DEFAULTS.zero_stage,
               recompute: RecomputeOpt = DEFAULTS.recompute, ...) -> None:
        settings = settings_from_options(precision=precision, zero=zero, recompute=recompute, ...)

Every value is parsed by :mod:`batchpilot.cli._options` (choices case-insensitive; a bad value is the
library's one line ``error: --precision 'fp7' is not one of: fp32, bf16, fp16, fp8``, exit code 2);
:class:`~batchpilot.specs.settings.RunSettings` checks the combinations.

Precision has one set of values everywhere and one default, bf16, except where steps run on a CPU
(:func:`step_precision`).
"""

from __future__ import annotations

from typing import Annotated

from batchpilot.cli._options import choice, option, whole
from batchpilot.specs.settings import (
    ATTENTIONS,
    ENGINES,
    FP8_RECIPES,
    LOSSES,
    OPTIMIZERS,
    PARAM_DTYPES,
    PRECISIONS,
    RECOMPUTES,
    RESHARDS,
    RunSettings,
)

#: The defaults every command uses (those of :class:`RunSettings`).
DEFAULTS = RunSettings()

CPU_PRECISION = "fp32"
"""The precision of steps run on a CPU when ``--precision`` is not given. bf16 autocast is only fast on
CPUs with bf16 matrix units (AVX512-BF16, AMX); elsewhere oneDNN converts around every matmul. Measured on
a shared 2-core Xeon with AMX (torch 2.13 CPU; ``batchpilot train --model tiny-llama-15m --seq-len 256
--global-batch 8 --steps 6 --threads 1 --no-noise``, tokens/s of two runs each): bf16 2,124 and 2,219 vs
fp32 738 and 1,247; with the bf16 units masked off (``ONEDNN_MAX_CPU_ISA=AVX512_CORE``) bf16 101 and 62
vs fp32 564 and 217; with ``ONEDNN_MAX_CPU_ISA=AVX2`` bf16 29 and 9 vs fp32 787 and 508. fp32 is the
default that is never the slow one; ``--precision bf16`` is the faster choice on an AMX CPU."""

_PANEL = "Run settings"
_PRECISION_HELP = "Compute precision (fp8 is modelled by memory and plan; probe, train and tune run fp32, bf16, fp16)."

PrecisionOpt = Annotated[str, option("--precision", choice("--precision", PRECISIONS), help=_PRECISION_HELP,
                                     rich_help_panel=_PANEL)]
StepPrecisionOpt = Annotated[str | None, option(
    "--precision", choice("--precision", PRECISIONS), show_default=f"bf16; {CPU_PRECISION} on a CPU",
    help=f"{_PRECISION_HELP} Steps on a CPU default to {CPU_PRECISION}: bf16 autocast is slower there unless "
         "the CPU has bf16 matrix units (AVX512-BF16 or AMX); give --precision bf16 on one that does.",
    rich_help_panel=_PANEL)]
OptimizerOpt = Annotated[str, option("--optimizer", choice("--optimizer", OPTIMIZERS), help="Optimizer.",
                                     rich_help_panel=_PANEL)]
EngineOpt = Annotated[str, option("--engine", choice("--engine", ENGINES),
                                  help="Training engine whose memory bookkeeping to model.", rich_help_panel=_PANEL)]
ZeroOpt = Annotated[int, option(
    "--zero", whole("--zero"), help="ZeRO stage / FSDP sharding: 0 none, 1 optimizer, 2 + gradients, 3 + parameters.",
    rich_help_panel=_PANEL)]
HybridShardOpt = Annotated[bool, option(
    "--hybrid-shard", help="Shard within a node, replicate across nodes (FSDP HYBRID_SHARD).",
    rich_help_panel=_PANEL)]
TpOpt = Annotated[int, option("--tp", whole("--tp"), help="Tensor-parallel size.", rich_help_panel=_PANEL)]
PpOpt = Annotated[int, option("--pp", whole("--pp"), help="Pipeline-parallel stages.", rich_help_panel=_PANEL)]
VppOpt = Annotated[int, option(
    "--vpp", whole("--vpp"), help="Virtual stages per pipeline rank (interleaved 1F1B; 1 = plain).",
    rich_help_panel=_PANEL)]
EpOpt = Annotated[int, option("--ep", whole("--ep"), help="Expert-parallel size (MoE).", rich_help_panel=_PANEL)]
SpOpt = Annotated[bool, option(
    "--sp", help="Sequence parallelism over the tensor-parallel group.", rich_help_panel=_PANEL)]
RecomputeOpt = Annotated[str, option(
    "--recompute", choice("--recompute", RECOMPUTES),
    help="Activation recomputation: selective = the attention core (Megatron-LM), op = torchtitan's per-op "
         "selective checkpointing, full = only each layer's input kept.",
    rich_help_panel=_PANEL)]
AttentionOpt = Annotated[str, option(
    "--attention", choice("--attention", ATTENTIONS), help="Attention kernel (eager stores the s×s scores).",
    rich_help_panel=_PANEL)]
OffloadOpt = Annotated[bool, option(
    "--offload", help="Optimizer states and master weights in CPU memory (ZeRO-Offload).",
    rich_help_panel=_PANEL)]
CpOpt = Annotated[int, option(
    "--cp", whole("--cp"), help="Context-parallel size: each sequence split over this many GPUs (ring attention).",
    rich_help_panel=_PANEL)]
RecomputeEveryOpt = Annotated[int, option(
    "--recompute-every", whole("--recompute-every"),
    help="Checkpoint 1 layer in N with --recompute (torchtitan's integer selective_ac_option; 1 = every layer).",
    rich_help_panel=_PANEL)]
CompileOpt = Annotated[bool, option(
    "--compile", help="torch.compile each transformer block (inductor saves fewer tensors; the loss too with "
                      "--loss auto).", rich_help_panel=_PANEL)]
Fp8RecipeOpt = Annotated[str | None, option(
    "--fp8-recipe", choice("--fp8-recipe", FP8_RECIPES), show_default="tensorwise (torchao); delayed with megatron",
    help="Scaling recipe of --precision fp8.", rich_help_panel=_PANEL)]
Fp8AllGatherOpt = Annotated[bool, option(
    "--fp8-all-gather", help="FSDP2 all-gathers weights in fp8 (tensorwise; torchtitan "
                             "enable_fsdp_float8_all_gather).", rich_help_panel=_PANEL)]
ReshardOpt = Annotated[str, option(
    "--reshard-after-forward", choice("--reshard-after-forward", RESHARDS),
    help="FSDP2 --zero 3 units freed after forward: default = all but [norm, output] (torchtitan since 2025-07), "
         "last = all but the last block and the root unit (torchtitan before), always, never.",
    rich_help_panel=_PANEL)]
LossOpt = Annotated[str, option(
    "--loss", choice("--loss", LOSSES),
    help="Cross-entropy path: auto = fused (megatron), parallel (fsdp2 with --tp), compiled (--compile), else eager.",
    rich_help_panel=_PANEL)]
LossChunksOpt = Annotated[int, option(
    "--loss-chunks", whole("--loss-chunks"), help="Chunks of --loss chunked (torchtune's default 8).",
    rich_help_panel=_PANEL)]
ParamDtypeOpt = Annotated[str, option(
    "--param-dtype", choice("--param-dtype", PARAM_DTYPES),
    help="Stored parameter dtype: fp32 = mixed precision, bf16 = pure bf16 (weights, gradients, optimizer states).",
    rich_help_panel=_PANEL)]


def step_precision(precision: str | None, device: str) -> str:
    """``--precision`` as given, else bf16 — or :data:`CPU_PRECISION` when ``device`` (auto|cpu|cuda) is a CPU.

    ``auto`` is a CPU when torch sees no CUDA device (what the commands then run on).
    """
    if precision is not None:
        return precision
    if device == "cpu":
        return CPU_PRECISION
    if device == "auto":
        import torch

        if not torch.cuda.is_available():
            return CPU_PRECISION
    return DEFAULTS.precision


def settings_from_options(
    *, precision: str = DEFAULTS.precision, optimizer: str = DEFAULTS.optimizer, engine: str = DEFAULTS.engine,
    zero: int = DEFAULTS.zero_stage, hybrid_shard: bool = DEFAULTS.hybrid_shard, tp: int = DEFAULTS.tp,
    pp: int = DEFAULTS.pp, ep: int = DEFAULTS.ep, sp: bool = DEFAULTS.sp, recompute: str = DEFAULTS.recompute,
    attention: str = DEFAULTS.attention, offload: bool = DEFAULTS.offload, vpp: int = DEFAULTS.vpp,
    cp: int = DEFAULTS.cp, recompute_every: int = DEFAULTS.recompute_every, compile: bool = DEFAULTS.compile,
    fp8_recipe: str | None = DEFAULTS.fp8_recipe, fp8_all_gather: bool = DEFAULTS.fp8_all_gather,
    reshard_after_forward: str = DEFAULTS.reshard_after_forward, loss: str = DEFAULTS.loss,
    loss_chunks: int = DEFAULTS.loss_chunks, param_dtype: str = DEFAULTS.param_dtype,
) -> RunSettings:
    """The :class:`RunSettings` the shared flags describe (raises ``SpecError`` on a bad value)."""
    return RunSettings(
        precision=precision.lower(),  # type: ignore[arg-type]  # checked by RunSettings
        optimizer=optimizer.lower(),  # type: ignore[arg-type]
        engine=engine.lower(),  # type: ignore[arg-type]
        zero_stage=zero, hybrid_shard=hybrid_shard, tp=tp, pp=pp, vpp=vpp, ep=ep, sp=sp, cp=cp,
        recompute=recompute.lower(),  # type: ignore[arg-type]
        recompute_every=recompute_every,
        attention=attention.lower(),  # type: ignore[arg-type]
        offload=offload, compile=compile,
        fp8_recipe=fp8_recipe.lower() if fp8_recipe else None,  # type: ignore[arg-type]
        fp8_all_gather=fp8_all_gather,
        reshard_after_forward=reshard_after_forward.lower(),  # type: ignore[arg-type]
        loss=loss.lower(),  # type: ignore[arg-type]
        loss_chunks=loss_chunks,
        param_dtype=param_dtype.lower(),  # type: ignore[arg-type]
    )
