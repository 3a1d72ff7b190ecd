"""``batchpilot tune`` — the one command: probe → memory → noise → plan → verify → report.

Examples::

    batchpilot tune                                        # CPU, tiny-llama-1m on the stdlib corpus, ~5 min
    batchpilot tune --gpu h100-sxm --gpus 64 --seq-len 256 # plus the plan for a 64 × H100 cluster
    batchpilot tune --out runs/tune --reuse --skip verify  # re-plan and re-report from the saved records
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from batchpilot.cli._common import console, handle_errors, print_json
from batchpilot.cli._finetune import FinetuneOpt, with_finetune
from batchpilot.cli._options import (
    DEMO_MODEL,
    DEMO_SEQ_LEN,
    DataOpt,
    DeviceOpt,
    GpusPerNodeOpt,
    JsonOpt,
    ModelOpt,
    SeedOpt,
    SeqLenOpt,
    TokenizerOpt,
    TrainTokensOpt,
    choice,
    duration,
    option,
    size,
    whole,
)
from batchpilot.cli._settings import (
    DEFAULTS,
    RecomputeEveryOpt,
    RecomputeOpt,
    StepPrecisionOpt,
    settings_from_options,
    step_precision,
)
from batchpilot.errors import BatchpilotError
from batchpilot.plan.engines import ENGINE_NAMES, LEGACY_ENGINES, get_engine
from batchpilot.records.tune_state import StageRecord
from batchpilot.specs.settings import check_effective
from batchpilot.tune.config import STAGES, TuneConfig
from batchpilot.units import format_bytes

_STATUS_STYLE = {"ok": "green", "reused": "cyan", "skipped": "yellow", "failed": "red"}


def _on_stage(stage: str, event: str, record: StageRecord | None) -> None:
    if event == "start":
        console.print(f"[bold]▶ {stage}[/bold] …")
    elif record is not None:
        style = _STATUS_STYLE[record.status]
        note = f" — {record.message}" if record.message else ""
        console.print(f"  [{style}]{record.status}[/{style}] in {record.seconds:.1f} s{note}")


def _on_trial(event: str, micro_batch: int, trial: Any) -> None:
    if event == "start":
        console.print(f"    trial micro-batch {micro_batch} …")
    elif trial is not None:
        fits = "fits" if trial.fits else "[red]does not fit[/red]"
        speed = f", {trial.tokens_per_s:,.0f} tokens/s" if trial.tokens_per_s else ""
        peak = f", peak {format_bytes(trial.peak_bytes)}" if trial.peak_bytes else ""
        console.print(f"    micro-batch {micro_batch}: {fits}{peak}{speed} ({trial.seconds:.1f} s)")


def _on_step(record: dict[str, Any]) -> None:
    step = record.get("step")
    if isinstance(step, int) and (step == 1 or step % 5 == 0):
        console.print(f"    step {step}: loss {record.get('loss', float('nan')):.3f}, "
                      f"{record.get('tokens_per_s') or 0:,.0f} tokens/s")


def _parse_skip(skip: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in skip.split(",") if s.strip())


@handle_errors
def tune(
    model: ModelOpt = DEMO_MODEL,
    data: DataOpt = "stdlib",
    tokenizer: TokenizerOpt = "bytes",
    device: DeviceOpt = "auto",
    gpu: Annotated[str | None, option("--gpu", metavar="NAME|FILE", help=(
        "Target accelerator for a cluster plan besides this device's: a catalog name or JSON file "
        "(see `batchpilot hardware list`)."))] = None,
    gpus: Annotated[int | None, option("--gpus", whole("--gpus"), show_default="1 with --gpu",
                                       help="GPUs in the target cluster.")] = None,
    gpus_per_node: GpusPerNodeOpt = 8,
    engine: Annotated[str, option("--engine", choice("--engine", (*ENGINE_NAMES, *LEGACY_ENGINES)), help=(
        "Engine the cluster plan is for (as `plan --engine`); batchpilot: the runner tune measures and verifies "
        "with, whose torchrun export launches the same training on the cluster."))] = "batchpilot",
    seq_len: SeqLenOpt = DEMO_SEQ_LEN,
    memory_budget: Annotated[int | None, option("--memory-budget", size("--memory-budget"), show_default=(
        "1GiB on a CPU, so the probe fits in --time-budget; CUDA: the device's memory"),
        help="Memory the probe may use (e.g. 6GiB).")] = None,
    time_budget: Annotated[float, option("--time-budget", duration("--time-budget"), help=(
        "The whole run, e.g. 5m, 10m."))] = "5m",  # type: ignore[assignment]  # parsed by duration()
    train_tokens: TrainTokensOpt = None,
    precision: StepPrecisionOpt = None,
    recompute: RecomputeOpt = DEFAULTS.recompute,
    recompute_every: RecomputeEveryOpt = DEFAULTS.recompute_every,
    out: Annotated[Path, option("--out", help="Run directory for every stage's record.")] = Path("runs/tune"),
    skip: Annotated[str, option("--skip", show_default="none", help=(
        f"Comma-separated stages to skip: {','.join(STAGES)}."))] = "",
    reuse: Annotated[bool, option("--reuse", help="Reuse stage records already in --out.")] = False,
    seed: SeedOpt = 0,
    finetune: FinetuneOpt = "full",
    json_output: JsonOpt = False,
) -> None:
    """Measure, plan, prove and show the batch size for a model on this device (and a target cluster)."""
    from batchpilot.tune.pipeline import run_tune

    settings = with_finetune(settings_from_options(precision=step_precision(precision, device), recompute=recompute,
                                                   recompute_every=recompute_every), finetune)
    check_effective(settings)
    config = TuneConfig(
        model=model, data=data, tokenizer=tokenizer, seq_len=seq_len,
        device=device,  # type: ignore[arg-type]  # checked by DeviceOpt
        memory_budget_bytes=memory_budget,
        settings=settings,
        gpu=gpu, gpus=(gpus or 1) if gpu is not None else gpus, gpus_per_node=gpus_per_node,
        engine=get_engine(engine).name,
        train_tokens=train_tokens, time_budget_s=time_budget, out=out, skip=_parse_skip(skip), reuse=reuse,
        seed=seed,
    )
    quiet = json_output
    result = run_tune(config, on_stage=None if quiet else _on_stage,
                      hooks={} if quiet else {"probe": _on_trial, "verify": _on_step})
    failed = [s for s in result.stages if s.status == "failed"]
    if json_output:
        print_json(result.to_dict())
    else:
        _render(result)
    if failed:
        raise BatchpilotError("; ".join(f"stage {s.name} failed: {s.message}" for s in failed)
                              + f" (records so far in {result.out})")


def _sig3(value: Any) -> str:
    """Three significant digits for a measured float (B_simple is an estimate), anything else as is."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _render(result: Any) -> None:
    summary = result.to_dict()
    plan = summary["plan"] or {}
    if plan:
        console.print(
            f"[bold green]plan[/bold green]: micro-batch {plan['micro_batch']} × accumulation {plan['grad_accum']} "
            f"× dp {plan['dp']} = global {plan['global_batch_sequences']} sequences "
            f"({plan['global_batch_tokens']:,} tokens); max micro-batch {summary['max_micro_batch']}, "
            f"knee {summary['knee_micro_batch']}, B_simple {_sig3(summary['b_simple_sequences'])}")
    cluster = result.state.plan.cluster_plan if result.state.plan is not None else None
    if cluster is not None:
        _render_cluster(cluster)
    if result.report_path:
        console.print(f"report: [bold]{result.report_path}[/bold]")


def _render_cluster(cluster: Any) -> None:
    """The target cluster's plan: its winner, why, and what looks wrong with it."""
    c, best = cluster.cluster, cluster.best
    where = f"{c.get('total_devices')} × {c.get('accelerator')}"
    if best is None:
        console.print(f"[bold]cluster plan[/bold] ({where}): none fits — see plan.json", highlight=False)
        return
    console.print(
        f"[bold]cluster plan[/bold] ({where}): micro-batch {best.micro_batch} × accumulation {best.grad_accum} × dp "
        f"{best.dp} = {best.global_batch_sequences} sequences ({best.global_batch_tokens:,} tokens), tp {best.tp} · "
        f"pp {best.pp}, ZeRO-{best.zero_stage}, recompute {best.recompute}, {best.tokens_per_s:,.0f} tokens/s — "
        f"target: {cluster.target_source}", highlight=False)
    if cluster.rationale:
        console.print(f"  why: {cluster.rationale}", highlight=False)
    for warning in cluster.warnings or ():
        console.print(f"  [yellow]warning[/yellow]: {warning}", highlight=False)
