"""``batchpilot tune`` — the one command: probe → memory → noise → plan → verify → report.

Examples::

    batchpilot tune                                        # CPU, tiny-llama-1m on the stdlib corpus, ~5 min
    batchpilot tune --gpu h100-sxm --gpus 64 --seq-len 256 # plus the plan for a 64 × H100 cluster
    batchpilot tune --out runs/tune --reuse --skip verify  # re-plan and re-report from the saved records
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from batchpilot.cli._common import console, handle_errors, print_json
from batchpilot.cli._settings import PrecisionOpt, RecomputeOpt
from batchpilot.errors import BatchpilotError
from batchpilot.specs.settings import RunSettings
from batchpilot.tune.config import STAGES, StageRecord, TuneConfig
from batchpilot.units import format_bytes, parse_bytes, parse_count, parse_seconds

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
    model: Annotated[str, typer.Option("--model", help="Preset name or config.json.")] = "tiny-llama-1m",
    data: Annotated[str, typer.Option("--data", help="stdlib, a text/JSONL/Parquet file or folder, hf:NAME.")] = "stdlib",
    tokenizer: Annotated[str, typer.Option("--tokenizer", help="bytes, bpe:VOCAB or a tokenizer folder.")] = "bytes",
    device: Annotated[str, typer.Option("--device", help="auto|cpu|cuda.")] = "auto",
    gpu: Annotated[str | None, typer.Option("--gpu", help="Target accelerator for a cluster plan.")] = None,
    gpus: Annotated[int | None, typer.Option("--gpus", help="Target cluster size (with --gpu).")] = None,
    gpus_per_node: Annotated[int, typer.Option("--gpus-per-node", help="GPUs per node of the target.")] = 8,
    seq_len: Annotated[str, typer.Option("--seq-len", help="Tokens per sequence.")] = "256",
    memory_budget: Annotated[str | None, typer.Option(
        "--memory-budget", help="Probe budget, e.g. 6GiB (CPU default 1GiB; CUDA: the device).")] = None,
    time_budget: Annotated[str, typer.Option("--time-budget", help="Whole run, e.g. 5m, 10m.")] = "5m",
    train_tokens: Annotated[str | None, typer.Option(
        "--train-tokens", help="Planned training tokens (e.g. 2T): the cluster plan shows the scaling-law prior.")] = None,
    precision: PrecisionOpt = "fp32",
    recompute: RecomputeOpt = "none",
    out: Annotated[Path, typer.Option("--out", help="Run directory for every stage's record.")] = Path("runs/tune"),
    skip: Annotated[str, typer.Option("--skip", help=f"Comma-separated stages to skip: {','.join(STAGES)}.")] = "",
    reuse: Annotated[bool, typer.Option("--reuse", help="Reuse stage records already in --out.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Model init and data order.")] = 0,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object at the end.")] = False,
) -> None:
    """Measure, plan, prove and show the batch size for a model on this device (and a target cluster)."""
    from batchpilot.tune.pipeline import run_tune

    if device not in ("auto", "cpu", "cuda"):
        raise BatchpilotError(f"--device {device!r}: use auto, cpu or cuda")
    config = TuneConfig(
        model=model, data=data, tokenizer=tokenizer, seq_len=parse_count(seq_len, "--seq-len"),
        device=device,  # type: ignore[arg-type]
        memory_budget_bytes=parse_bytes(memory_budget, "--memory-budget") if memory_budget else None,
        settings=RunSettings(precision=precision, recompute=recompute),  # type: ignore[arg-type]
        gpu=gpu, gpus=gpus, gpus_per_node=gpus_per_node,
        train_tokens=parse_count(train_tokens, "--train-tokens") if train_tokens else None,
        time_budget_s=parse_seconds(time_budget, "--time-budget"), out=out, skip=_parse_skip(skip), reuse=reuse,
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
    if result.report_path:
        console.print(f"report: [bold]{result.report_path}[/bold]")
