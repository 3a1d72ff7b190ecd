"""The run-settings flags shared by ``memory``, ``plan``, ``probe`` and ``tune`` — one definition.

Use the ``Annotated`` aliases as parameter types and :data:`DEFAULTS` for the defaults, then build the
settings with :func:`settings_from_options` (validation errors become one line and exit 2 through
``handle_errors``)::

    @handle_errors
    def plan(
        ...,
        precision: PrecisionOpt = DEFAULTS.precision, optimizer: OptimizerOpt = DEFAULTS.optimizer,
        engine: EngineOpt = DEFAULTS.engine, zero: ZeroOpt = DEFAULTS.zero_stage,
        hybrid_shard: HybridShardOpt = DEFAULTS.hybrid_shard, tp: TpOpt = DEFAULTS.tp, pp: PpOpt = DEFAULTS.pp,
        ep: EpOpt = DEFAULTS.ep, sp: SpOpt = DEFAULTS.sp, recompute: RecomputeOpt = DEFAULTS.recompute,
        attention: AttentionOpt = DEFAULTS.attention, offload: OffloadOpt = DEFAULTS.offload,
    ) -> None:
        settings = settings_from_options(precision=precision, optimizer=optimizer, engine=engine, zero=zero,
                                         hybrid_shard=hybrid_shard, tp=tp, pp=pp, ep=ep, sp=sp,
                                         recompute=recompute, attention=attention, offload=offload)

Values are plain strings/ints checked by :class:`~batchpilot.specs.settings.RunSettings` (not click
choices), so a bad value is the library's one-line message with the allowed values, exit code 2.
"""

from __future__ import annotations

from typing import Annotated

import typer

from batchpilot.specs.settings import (
    ATTENTIONS,
    ENGINES,
    OPTIMIZERS,
    PRECISIONS,
    RECOMPUTES,
    RunSettings,
)

#: The defaults every command uses (those of :class:`RunSettings`).
DEFAULTS = RunSettings()

_PANEL = "Run settings"


def _choices(values: tuple[str, ...]) -> str:
    return "|".join(values)


PrecisionOpt = Annotated[str, typer.Option(
    "--precision", help=f"Compute precision: {_choices(PRECISIONS)}.", rich_help_panel=_PANEL)]
OptimizerOpt = Annotated[str, typer.Option(
    "--optimizer", help=f"Optimizer: {_choices(OPTIMIZERS)}.", rich_help_panel=_PANEL)]
EngineOpt = Annotated[str, typer.Option(
    "--engine", help=f"Training engine whose memory bookkeeping to model: {_choices(ENGINES)}.",
    rich_help_panel=_PANEL)]
ZeroOpt = Annotated[int, typer.Option(
    "--zero", help="ZeRO stage / FSDP sharding: 0 none, 1 optimizer, 2 + gradients, 3 + parameters.",
    rich_help_panel=_PANEL)]
HybridShardOpt = Annotated[bool, typer.Option(
    "--hybrid-shard", help="Shard within a node, replicate across nodes (FSDP HYBRID_SHARD).",
    rich_help_panel=_PANEL)]
TpOpt = Annotated[int, typer.Option("--tp", help="Tensor-parallel size.", rich_help_panel=_PANEL)]
PpOpt = Annotated[int, typer.Option("--pp", help="Pipeline-parallel stages.", rich_help_panel=_PANEL)]
VppOpt = Annotated[int, typer.Option(
    "--vpp", help="Virtual stages per pipeline rank (interleaved 1F1B; 1 = plain).", rich_help_panel=_PANEL)]
EpOpt = Annotated[int, typer.Option("--ep", help="Expert-parallel size (MoE).", rich_help_panel=_PANEL)]
SpOpt = Annotated[bool, typer.Option(
    "--sp", help="Sequence parallelism over the tensor-parallel group.", rich_help_panel=_PANEL)]
RecomputeOpt = Annotated[str, typer.Option(
    "--recompute", help=f"Activation recomputation: {_choices(RECOMPUTES)}.", rich_help_panel=_PANEL)]
AttentionOpt = Annotated[str, typer.Option(
    "--attention", help=f"Attention kernel: {_choices(ATTENTIONS)} (eager stores the s×s scores).",
    rich_help_panel=_PANEL)]
OffloadOpt = Annotated[bool, typer.Option(
    "--offload", help="Optimizer states and master weights in CPU memory (ZeRO-Offload).",
    rich_help_panel=_PANEL)]


def settings_from_options(
    *, precision: str = DEFAULTS.precision, optimizer: str = DEFAULTS.optimizer, engine: str = DEFAULTS.engine,
    zero: int = DEFAULTS.zero_stage, hybrid_shard: bool = DEFAULTS.hybrid_shard, tp: int = DEFAULTS.tp,
    pp: int = DEFAULTS.pp, ep: int = DEFAULTS.ep, sp: bool = DEFAULTS.sp, recompute: str = DEFAULTS.recompute,
    attention: str = DEFAULTS.attention, offload: bool = DEFAULTS.offload, vpp: int = DEFAULTS.vpp,
) -> RunSettings:
    """The :class:`RunSettings` the shared flags describe (raises ``SpecError`` on a bad value)."""
    return RunSettings(
        precision=precision.lower(),  # type: ignore[arg-type]  # checked by RunSettings
        optimizer=optimizer.lower(),  # type: ignore[arg-type]
        engine=engine.lower(),  # type: ignore[arg-type]
        zero_stage=zero, hybrid_shard=hybrid_shard, tp=tp, pp=pp, vpp=vpp, ep=ep, sp=sp,
        recompute=recompute.lower(),  # type: ignore[arg-type]
        attention=attention.lower(),  # type: ignore[arg-type]
        offload=offload,
    )
