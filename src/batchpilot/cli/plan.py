"""``batchpilot plan`` — the fastest feasible batch triad and parallel layout, ranked, with exports.

Examples::

    batchpilot plan --model llama-3-8b --gpu h100-sxm --gpus 64 --seq-len 8192 --global-batch-tokens 4Mi
    batchpilot plan --model deepseek-v3 --gpu h800 --gpus 2048 --seq-len 4096 --like deepseek-v3 --engine megatron
    batchpilot plan --model llama-3-70b --gpu h100-sxm --gpus 512 --seq-len 8192 --global-batch 512 \\
        --engine hf --export hf --out training_args.json
    batchpilot plan --model llama-3-8b --gpu h100-sxm --gpus 16 --seq-len 8192 --global-batch-tokens 4Mi \\
        --engine deepspeed --export deepspeed --out ds_config.json
    batchpilot plan --model tiny-llama-1m --gpu rtx-4090 --gpus 1 --seq-len 256 --global-batch 32 --json
    batchpilot plan --model llama-3-8b --gpu h100-sxm --gpus 64 --seq-len 8192 --train-tokens 15T
    batchpilot plan --model tiny-llama-15m --gpu h100-sxm --gpus 8 --seq-len 512 --noise noise.json
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from batchpilot.cli._common import console, err_console, handle_errors, print_json
from batchpilot.cli._finetune import (
    Budget,
    DatasetTokensOpt,
    EpochsOpt,
    PlanFinetuneOpt,
    PriceOpt,
    modes_for,
    plan_cost,
    render_cost,
    render_modes,
    request_with_finetune,
    suggest_modes,
)
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
    CompileOpt,
    Fp8AllGatherOpt,
    Fp8RecipeOpt,
    HybridShardOpt,
    LossChunksOpt,
    LossOpt,
    OffloadOpt,
    OptimizerOpt,
    ParamDtypeOpt,
    PrecisionOpt,
    RecomputeEveryOpt,
    ReshardOpt,
    SpOpt,
)
from batchpilot.errors import InfeasibleError
from batchpilot.plan import exports
from batchpilot.plan.engines import DEFAULT_ENGINE, ENGINE_NAMES, ENGINES, LEGACY_ENGINES
from batchpilot.plan.explain import describe_target
from batchpilot.plan.exports import FORMATS, ExportOptions
from batchpilot.plan.options import DEFAULT_INTER_NODE_BANDWIDTH, PlanOptions, plan_record, prepare_plan
from batchpilot.plan.planner import DEFAULT_HEADROOM, Pins, PlanResult, plan
from batchpilot.records.cost import FineTuneMode
from batchpilot.report.present import plan_table, step_parts
from batchpilot.specs.settings import RECOMPUTES

_PINS = "Pins (fix a choice; omitted = searched)"
_ENGINE_HELP = (
    "Engine that will run the plan; only what it runs is searched, with its memory bookkeeping: "
    + "; ".join(f"{c.name} = {c.title} (--export {', '.join(c.exports)})" for c in ENGINES.values())
    + f". The earlier names torch and fsdp2 mean {LEGACY_ENGINES['torch']} and {LEGACY_ENGINES['fsdp2']}.")
_SEARCHED = "searched"
_TARGET = "Target global batch (exactly one)"


def _render(result: PlanResult, source: str) -> None:
    r = result.request
    c = r.cluster
    engine = f" with {r.engine}" if r.engine else ""
    console.print(
        f"[bold]{r.model.name}[/] on {c.total_devices} × {c.accelerator.name} ({c.devices_per_node} per node)"
        f"{engine}, seq {r.seq_len}, target {describe_target(result)}" + (f" — {source}" if source else ""),
        highlight=False)
    shown = plan_table(tuple(p.to_record() for p in result.plans))
    table = Table(*(c.header for c in shown.columns), box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0),
                  caption="ranked by tokens/s (whole job); GiB and TFLOP/s per GPU")
    for row in shown.rows:
        table.add_row(*(cell.text for cell in row))
    console.print(table)
    console.print(f"[bold]winner[/]: {result.rationale}")
    _render_step(result)
    memory = sum(1 for x in result.rejected if x.kind == "memory")
    batch = len(result.rejected) - memory
    console.print(f"searched {result.layouts} layouts ({result.memory_evaluations} memory evaluations, "
                  f"{result.pruned} pruned by throughput bound); rejected: {memory} do not fit, "
                  f"{batch} cannot reach the batch; efficiency: {r.calibration.source}")


def _render_step(result: PlanResult) -> None:
    """The winner's step by part (compute by op class, exposed communication by pattern, bubble, optimizer)."""
    best = result.plans[0]
    parts = step_parts(best.to_record())
    table = Table("winner's step", "s", "share", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
    for part in parts:
        table.add_row(part.label, part.text.removesuffix(" s"), f"{part.value / best.step.step_time_s:.0%}")
    console.print(table)
    console.print(f"kernel speeds: {best.step.kernel_profile} profile, attention {best.step.attention_kernel}")


def _render_modes_only(modes: tuple[FineTuneMode, ...], json_output: bool) -> None:
    """``--finetune compare`` when full training itself does not fit: the modes alone."""
    if json_output:
        print_json({"finetune_modes": [m.to_dict() for m in modes]})
        return
    render_modes(modes)


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
        "--train-tokens", count("--train-tokens"), help="Training tokens D: the target batch from the DeepSeek LLM prior, and the budget the run's time and cost are computed for (see --epochs for a budget with another target).",
        rich_help_panel=_TARGET)] = None,
    noise: Annotated[Path | None, option(
        "--noise", help="`batchpilot noise --json` file: target B_crit ≈ B_simple.", rich_help_panel=_TARGET)] = None,
    gpus_per_node: GpusPerNodeOpt = 8,
    inter_node_bandwidth: Annotated[int, option(
        "--inter-node-bandwidth", size("--inter-node-bandwidth"),
        help="Per-GPU network bandwidth between nodes, one direction, in bytes/s (50GB = 50·10^9)."),
    ] = DEFAULT_INTER_NODE_BANDWIDTH,  # type: ignore[assignment]  # parsed by size()
    network: Annotated[str | None, option(
        "--network", show_default="400 Gb/s InfiniBand's measured fraction",
        help="Network between nodes (`batchpilot hardware networks`): its per-GPU link peak and measured achieved "
             "all-reduce bandwidth (unless --inter-node-bandwidth gives another peak).")] = None,
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
    cp: Annotated[int | None, option(
        "--cp", whole("--cp"), help="Context-parallel size (torchtitan, megatron).", show_default=_SEARCHED,
        rich_help_panel=_PINS)] = None,
    zero: Annotated[int | None, option("--zero", whole("--zero"), help="ZeRO stage 0-3.", show_default=_SEARCHED,
                                       rich_help_panel=_PINS)] = None,
    recompute: Annotated[str | None, option(
        "--recompute", choice("--recompute", RECOMPUTES), help="Activation recomputation.",
        show_default=_SEARCHED, rich_help_panel=_PINS)] = None,
    precision: PrecisionOpt = DEFAULTS.precision, optimizer: OptimizerOpt = DEFAULTS.optimizer,
    engine: Annotated[str, option("--engine", choice("--engine", (*ENGINE_NAMES, *LEGACY_ENGINES)),
                                  help=_ENGINE_HELP, rich_help_panel="Run settings")] = DEFAULT_ENGINE,
    hybrid_shard: HybridShardOpt = DEFAULTS.hybrid_shard,
    sp: SpOpt = DEFAULTS.sp, attention: AttentionOpt = DEFAULTS.attention, offload: OffloadOpt = DEFAULTS.offload,
    recompute_every: RecomputeEveryOpt = DEFAULTS.recompute_every, compile: CompileOpt = DEFAULTS.compile,
    fp8_recipe: Fp8RecipeOpt = DEFAULTS.fp8_recipe, fp8_all_gather: Fp8AllGatherOpt = DEFAULTS.fp8_all_gather,
    reshard_after_forward: ReshardOpt = DEFAULTS.reshard_after_forward, loss: LossOpt = DEFAULTS.loss,
    loss_chunks: LossChunksOpt = DEFAULTS.loss_chunks, param_dtype: ParamDtypeOpt = DEFAULTS.param_dtype,
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
    data: Annotated[str | None, option("--data", help=(
        "Training data the exported run reads (batchpilot train --data, torchtitan dataset_path, Megatron "
        "--data-path)."))] = None,
    finetune: PlanFinetuneOpt = None, epochs: EpochsOpt = None, dataset_tokens: DatasetTokensOpt = None,
    price_per_gpu_hour: PriceOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Rank feasible (micro-batch, accumulation, dp, tp, pp, ep, ZeRO, recompute) by tokens/s."""
    options = PlanOptions(
        model=model, gpu=gpu, seq_len=seq_len, gpus=gpus, gpus_per_node=gpus_per_node,
        inter_node_bandwidth_bytes_per_s=inter_node_bandwidth, network=network, global_batch_tokens=global_batch_tokens,
        global_batch=global_batch, like=like, train_tokens=train_tokens, noise=noise,
        pins=Pins(micro_batch=micro_batch, grad_accum=grad_accum, tp=tp, pp=pp, vpp=vpp, ep=ep, cp=cp, zero_stage=zero,
                  recompute=recompute),
        precision=precision, optimizer=optimizer, engine=engine, hybrid_shard=hybrid_shard, sp=sp,
        attention=attention, offload=offload, recompute_every=recompute_every, compile=compile, fp8_recipe=fp8_recipe,
        fp8_all_gather=fp8_all_gather, reshard_after_forward=reshard_after_forward, loss=loss,
        loss_chunks=loss_chunks, param_dtype=param_dtype, headroom=headroom, max_deviation=max_deviation,
        calibration=calibration, top=top)
    prepared = prepare_plan(options)
    prepared = replace(prepared, request=request_with_finetune(prepared.request, finetune))
    request = prepared.request
    budget = Budget(train_tokens=train_tokens, epochs=epochs, dataset_tokens=dataset_tokens, price=price_per_gpu_hour)
    modes = modes_for(request, budget) if (finetune or "").strip().lower() == "compare" else None
    try:
        result = plan(request)
    except InfeasibleError as exc:
        if modes is None:
            raise suggest_modes(exc, request) from None
        _render_modes_only(modes, json_output)
        return
    cost = plan_cost(result, budget)
    exported = exports.export(result.plans[0], request, export, ExportOptions(data=data)) if export else None
    if exported is not None and out is not None:  # before any warning: a refusal or a failed write is the one line
        out.write_text(exported.text, encoding="utf-8")
    for warning in (*prepared.warnings, *result.warnings):
        err_console.print(f"warning: {warning}", soft_wrap=True, markup=False, highlight=False)
    for note in exported.notes if exported is not None else ():
        err_console.print(f"note: {note}", soft_wrap=True, markup=False, highlight=False)
    if exported is not None and out is None:
        typer.echo(exported.text, nl=False)
        return
    if json_output:
        record = replace(plan_record(prepared, result, export=export, out=str(out)), cost=cost, finetune_modes=modes)
        print_json(record.to_dict())
        return
    _render(result, prepared.source)
    if cost is not None:
        render_cost(cost)
    if modes is not None:
        render_modes(modes)
    if export:
        console.print(f"exported the winner as {export} to {out}")
