"""``batchpilot plan`` — the fastest feasible batch triad and parallel layout, ranked, with exports.

Examples::

    batchpilot plan --model llama-3-8b --gpu h100-sxm --gpus 64 --seq-len 8192 --global-batch-tokens 4Mi
    batchpilot plan --model deepseek-v3 --gpu h800 --gpus 2048 --seq-len 4096 --like deepseek-v3 --engine megatron
    batchpilot plan --model llama-3-70b --gpu h100-sxm --gpus 512 --seq-len 8192 --global-batch 512 \\
        --engine deepspeed --tp 1 --pp 1 --export deepspeed --out ds_config.json
    batchpilot plan --model tiny-llama-1m --gpu rtx-4090 --gpus 1 --seq-len 256 --global-batch 32 --json
    batchpilot plan --model llama-3-8b --gpu h100-sxm --gpus 64 --seq-len 8192 --train-tokens 15T
    batchpilot plan --model tiny-llama-15m --gpu h100-sxm --gpus 8 --seq-len 512 --noise noise.json
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from batchpilot.cli._common import console, err_console, handle_errors, print_json
from batchpilot.cli._options import (
    GpuOpt,
    GpusOpt,
    GpusPerNodeOpt,
    JsonOpt,
    ModelOpt,
    SeqLenOpt,
    choice,
    count,
    fraction,
    option,
    size,
    whole,
)
from batchpilot.cli._settings import (
    DEFAULTS,
    AttentionOpt,
    EngineOpt,
    HybridShardOpt,
    OffloadOpt,
    OptimizerOpt,
    PrecisionOpt,
    SpOpt,
)
from batchpilot.errors import SpecError
from batchpilot.estimate.calibration import (
    DEFAULT_CALIBRATION,
    Calibration,
    check_calibration_accelerator,
    load_calibration,
)
from batchpilot.plan.exports import FORMATS, export_text
from batchpilot.plan.planner import DEFAULT_HEADROOM, Pins, PlanRequest, PlanResult, plan
from batchpilot.plan.priors import global_batch_from_noise, global_batch_from_prior
from batchpilot.plan.registry import target_global_batch
from batchpilot.records.noise import NoiseRecord
from batchpilot.specs.hardware import ClusterSpec, check_device_count, load_accelerator
from batchpilot.specs.model import ModelSpec, load_model
from batchpilot.specs.settings import RECOMPUTES, RunSettings
from batchpilot.units import GIB, format_count

_PINS = "Pins (fix a choice; omitted = searched)"
_SEARCHED = "searched"
_TARGET = "Target global batch (exactly one)"

DEFAULT_INTER_NODE_BANDWIDTH = "50GB"
"""Per GPU, one direction: one 400 Gb/s InfiniBand/RoCE NIC per GPU (DGX H100 reference architecture:
8 × ConnectX-7 400 Gb/s; DeepSeek-V3 §3.1 reports the same 50 GB/s IB per H800)."""


def build_cluster(gpu: str, gpus: int, gpus_per_node: int, inter_node_bandwidth_bytes_per_s: int) -> ClusterSpec:
    """The cluster the flags describe: ``gpus`` GPUs in nodes of ``gpus_per_node`` (a smaller job: part of one)."""
    check_device_count(gpus)
    per_node = gpus_per_node
    if per_node < 1:
        raise SpecError(f"--gpus-per-node {per_node!r} must be a positive integer")
    per_node = min(per_node, gpus)  # a job smaller than a node uses part of one node
    if gpus % per_node:
        fixes = sorted({g for g in (gpus - gpus % per_node, gpus + per_node - gpus % per_node) if g > 0})
        raise SpecError(f"--gpus {gpus} is not a multiple of --gpus-per-node {per_node}; "
                        f"use --gpus {' or '.join(map(str, fixes))}")
    nodes = gpus // per_node
    bandwidth = float(inter_node_bandwidth_bytes_per_s)
    return ClusterSpec(accelerator=load_accelerator(gpu), devices_per_node=per_node, num_nodes=nodes,
                       inter_node_bandwidth_bytes_per_s=bandwidth if nodes > 1 else None)


SOFT_TARGET_DEVIATION = 0.10
"""Default --max-deviation for targets that are estimates (--train-tokens prior, --noise measurement):
their own uncertainty is far larger (DeepSeek LLM Fig. 3 shows a wide near-optimal band)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class _Target:
    sequences: int | None = None
    tokens: int | None = None
    source: str = ""
    """Where the target comes from, for display."""
    soft: bool = False
    """An estimate (prior or measurement) rather than a user's exact batch."""
    record: dict[str, Any] = field(default_factory=dict)
    """Extra JSON for ``target`` (the prior's or the measurement's suggestion)."""
    warnings: tuple[str, ...] = ()


def _target(*, global_batch_tokens: int | None, global_batch: int | None, like: str | None,
            train_tokens: int | None, noise: Path | None, seq_len: int, model: ModelSpec) -> _Target:
    given = [name for name, v in (("--global-batch-tokens", global_batch_tokens), ("--global-batch", global_batch),
                                  ("--like", like), ("--train-tokens", train_tokens), ("--noise", noise))
             if v is not None]
    if len(given) != 1:
        raise SpecError(f"give exactly one target global batch: --global-batch-tokens, --global-batch, --like, "
                        f"--train-tokens or --noise (got {', '.join(given) or 'none'})")
    if global_batch_tokens is not None:
        return _Target(tokens=global_batch_tokens)
    if global_batch is not None:
        return _Target(sequences=global_batch)
    if like is not None:
        sequences, _tokens, entry = target_global_batch(like, seq_len)
        return _Target(sequences=sequences,
                       source=f"published batch of {entry.name} ({entry.source.title}, {entry.source.section})")
    if train_tokens is not None:
        prior = global_batch_from_prior(num_layers=model.num_layers, hidden_size=model.hidden_size, seq_len=seq_len,
                                        train_tokens=train_tokens)
        lr = f", peak LR {prior.learning_rate:.2e}" if prior.learning_rate else ""
        return _Target(sequences=prior.batch_sequences, soft=True, record={"prior": prior.to_dict()},
                       source=f"DeepSeek LLM prior B_opt = 0.2920·C^0.3271 = {format_count(prior.batch_tokens)} "
                              f"tokens at C = {prior.compute_flops:.2e} FLOPs{lr}")
    assert noise is not None
    record = NoiseRecord.load(noise)
    suggestion = global_batch_from_noise(record, seq_len=seq_len, where=f"noise file {str(noise)!r}")
    warnings: tuple[str, ...] = ()
    if record.seq_len is not None and record.seq_len != seq_len:
        warnings = (f"the noise file was measured at seq {record.seq_len}, planning at --seq-len {seq_len}: "
                    f"B_simple in tokens scales with the tokens per sequence",)
    return _Target(sequences=suggestion.batch_sequences, soft=True, record={"noise": suggestion.to_dict()},
                   warnings=warnings, source=f"measured B_simple ≈ B_crit = {record.b_simple_sequences:.0f} sequences "
                                             f"({record.steps_measured} steps, {noise})")


def _calibration(path: Path | None, cluster: ClusterSpec) -> tuple[Calibration, tuple[str, ...]]:
    """The --calibration file, refused unless it was measured on --gpu (warned when it records none)."""
    if path is None:
        return DEFAULT_CALIBRATION, ()
    calibration = load_calibration(path)
    warning = check_calibration_accelerator(calibration, cluster.accelerator.name,
                                            where=f"calibration file {str(path)!r}")
    return calibration, (warning,) if warning else ()


def _rate(per_s: float) -> str:
    return f"{per_s / 1e6:.2f}M" if per_s >= 1e6 else f"{per_s / 1e3:.0f}K" if per_s >= 1e4 else f"{per_s:.0f}"


def _render(result: PlanResult, source: str) -> None:
    r = result.request
    c = r.cluster
    target = result.target_sequences
    console.print(
        f"[bold]{r.model.name}[/] on {c.total_devices} × {c.accelerator.name} ({c.devices_per_node} per node), "
        f"seq {r.seq_len}, target {target:.6g} sequences = {format_count(target * r.seq_len)} tokens"
        + (f" — {source}" if source else "")
    )
    deviates = any(p.deviation for p in result.plans)
    last = ("Δ batch", "MFU") if deviates else ("TFLOP/s", "MFU")  # keep the table within 80 columns
    table = Table("m×acc×dp", "tp·pp(v)·ep", "ZeRO", "recompute", "GiB", "step s", "tokens/s", *last,
                  box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0),
                  caption="ranked by tokens/s (whole job); GiB and TFLOP/s per GPU")
    for p in result.plans:
        t, s, st = p.triad, p.settings, p.step
        extra = f"{p.deviation:+.2%}" if deviates else f"{st.tflops_per_gpu:.0f}"
        table.add_row(f"{t.micro_batch_sequences}×{t.grad_accum_steps}×{t.data_parallel_ranks}",
                      f"{s.tp}·{s.pp}{f'v{s.vpp}' if s.vpp > 1 else ''}·{s.ep}", str(s.zero_stage), s.recompute, f"{p.memory.total_bytes / GIB:.1f}",
                      f"{st.step_time_s:.3g}", _rate(st.tokens_per_s), extra, f"{st.mfu:.1%}")
    console.print(table)
    console.print(f"[bold]winner[/]: {result.rationale}")
    memory = sum(1 for x in result.rejected if x.kind == "memory")
    batch = len(result.rejected) - memory
    console.print(f"searched {result.layouts} layouts ({result.memory_evaluations} memory evaluations, "
                  f"{result.pruned} pruned by throughput bound); rejected: {memory} do not fit, "
                  f"{batch} cannot reach the batch; efficiency: {r.calibration.source}")


@handle_errors
def plan_command(
    model: ModelOpt,
    gpu: GpuOpt,
    seq_len: SeqLenOpt,
    gpus: GpusOpt = 1,
    global_batch_tokens: Annotated[int | None, option(
        "--global-batch-tokens", count("--global-batch-tokens"),
        help="Target global batch in tokens (4Mi = 4,194,304; 4M = 4,000,000).", rich_help_panel=_TARGET)] = None,
    global_batch: Annotated[int | None, option(
        "--global-batch", count("--global-batch"), help="Target global batch in sequences.",
        rich_help_panel=_TARGET)] = None,
    like: Annotated[str | None, option(
        "--like", help="Use a published model's batch (see `batchpilot known`).", rich_help_panel=_TARGET)] = None,
    train_tokens: Annotated[int | None, option(
        "--train-tokens", count("--train-tokens"), help="Training tokens D: target from the DeepSeek LLM prior.",
        rich_help_panel=_TARGET)] = None,
    noise: Annotated[Path | None, option(
        "--noise", help="`batchpilot noise --json` file: target B_crit ≈ B_simple.", rich_help_panel=_TARGET)] = None,
    gpus_per_node: GpusPerNodeOpt = 8,
    inter_node_bandwidth: Annotated[int, option(
        "--inter-node-bandwidth", size("--inter-node-bandwidth"),
        help="Per-GPU network bandwidth between nodes, one direction, in bytes/s (50GB = 50·10^9)."),
    ] = DEFAULT_INTER_NODE_BANDWIDTH,  # type: ignore[assignment]  # parsed by size()
    micro_batch: Annotated[int | None, option(
        "--micro-batch", count("--micro-batch"), help="Sequences per GPU per forward/backward.",
        show_default=_SEARCHED, rich_help_panel=_PINS)] = None,
    grad_accum: Annotated[int | None, option(
        "--grad-accum", whole("--grad-accum"), help="Micro-batches accumulated per optimizer step.",
        show_default=_SEARCHED, rich_help_panel=_PINS)] = None,
    tp: Annotated[int | None, option("--tp", whole("--tp"), help="Tensor-parallel size.", show_default=_SEARCHED,
                                     rich_help_panel=_PINS)] = None,
    pp: Annotated[int | None, option("--pp", whole("--pp"), help="Pipeline stages.", show_default=_SEARCHED,
                                     rich_help_panel=_PINS)] = None,
    vpp: Annotated[int | None, option(
        "--vpp", whole("--vpp"), help="Virtual stages per pipeline rank (interleaved 1F1B; 1 = plain).",
        show_default=_SEARCHED, rich_help_panel=_PINS)] = None,
    ep: Annotated[int | None, option("--ep", whole("--ep"), help="Expert-parallel size.", show_default=_SEARCHED,
                                     rich_help_panel=_PINS)] = None,
    zero: Annotated[int | None, option("--zero", whole("--zero"), help="ZeRO stage 0-3.", show_default=_SEARCHED,
                                       rich_help_panel=_PINS)] = None,
    recompute: Annotated[str | None, option(
        "--recompute", choice("--recompute", RECOMPUTES), help="Activation recomputation.",
        show_default=_SEARCHED, rich_help_panel=_PINS)] = None,
    precision: PrecisionOpt = DEFAULTS.precision, optimizer: OptimizerOpt = DEFAULTS.optimizer,
    engine: EngineOpt = DEFAULTS.engine, hybrid_shard: HybridShardOpt = DEFAULTS.hybrid_shard,
    sp: SpOpt = DEFAULTS.sp, attention: AttentionOpt = DEFAULTS.attention, offload: OffloadOpt = DEFAULTS.offload,
    headroom: Annotated[float, option("--headroom", fraction("--headroom"), help=(
        "Memory kept free per GPU, a fraction (0.1) or a percentage (10%)."))
    ] = f"{DEFAULT_HEADROOM:.0%}",  # type: ignore[assignment]  # parsed by fraction()
    max_deviation: Annotated[float | None, option(
        "--max-deviation", fraction("--max-deviation"), show_default="0; 10% for --train-tokens and --noise",
        help="Allow the nearest global batch within this fraction of the target (estimated targets are "
             "uncertain by more than that).")] = None,
    calibration: Annotated[Path | None, option(
        "--calibration", help="Efficiency/overhead file written by `batchpilot probe --calibration-out` on a "
        "--gpu: a file measured on another accelerator (or on CPU) is refused; one recording no accelerator "
        "is used with a warning.")] = None,
    top: Annotated[int, option("--top", whole("--top"), help="Plans to show.")] = 5,
    export: Annotated[str | None, option("--export", choice("--export", tuple(FORMATS)), help=(
        "Export the winner for this engine."))] = None,
    out: Annotated[Path | None, option("--out", show_default="stdout", help="File for --export.")] = None,
    json_output: JsonOpt = False,
) -> None:
    """Rank feasible (micro-batch, accumulation, dp, tp, pp, ep, ZeRO, recompute) by tokens/s."""
    spec = load_model(model)
    target = _target(global_batch_tokens=global_batch_tokens, global_batch=global_batch, like=like,
                     train_tokens=train_tokens, noise=noise, seq_len=seq_len, model=spec)
    deviation = max_deviation if max_deviation is not None else SOFT_TARGET_DEVIATION if target.soft else 0.0
    settings = RunSettings(precision=precision.lower(), optimizer=optimizer.lower(),  # type: ignore[arg-type]
                           engine=engine.lower(), hybrid_shard=hybrid_shard, sp=sp,  # type: ignore[arg-type]
                           attention=attention.lower(), offload=offload,  # type: ignore[arg-type]
                           zero_stage=1 if offload else 0)
    cluster = build_cluster(gpu, gpus, gpus_per_node, inter_node_bandwidth)
    measured, calibration_warnings = _calibration(calibration, cluster)
    warnings = (*target.warnings, *calibration_warnings)
    request = PlanRequest(
        model=spec, cluster=cluster,
        seq_len=seq_len, global_batch_sequences=target.sequences, global_batch_tokens=target.tokens, settings=settings,
        pins=Pins(micro_batch=micro_batch, grad_accum=grad_accum, tp=tp, pp=pp, vpp=vpp, ep=ep, zero_stage=zero,
                  recompute=recompute),
        headroom=headroom, max_deviation=deviation,
        calibration=measured, top=top,
    )
    result = plan(request)
    for warning in warnings:
        err_console.print(f"warning: {warning}", soft_wrap=True, markup=False, highlight=False)
    exported = export_text(result.plans[0], request, export) if export else None
    if exported is not None and out is None:
        typer.echo(exported, nl=False)
        return
    if exported is not None and out is not None:
        out.write_text(exported, encoding="utf-8")
    if json_output:
        base = result.to_record()
        record = replace(base, target=replace(base.target, source=target.source, **target.record), warnings=warnings,
                         export={"format": export, "path": str(out)} if export else None)
        print_json(record.to_dict())
        return
    _render(result, target.source)
    if export:
        console.print(f"exported the winner as {export} to {out}")
