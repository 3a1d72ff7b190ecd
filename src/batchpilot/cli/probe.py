"""``batchpilot probe`` — real training steps on the real device: max micro-batch, knee, calibration.

Examples::

    batchpilot probe --model tiny-llama-1m --seq-len 128 --memory-budget 128MiB --device cpu
    batchpilot probe --model tiny-llama-15m --seq-len 512 --memory-budget 2GiB --precision fp32 \\
        --calibration-out cpu-calibration.json --json
    batchpilot probe --model ./config.json --seq-len 4096 --device cuda --precision bf16 --recompute full \\
        --gpu h100-sxm --calibration-out h100.json

On CPU every trial runs in its own process under an address-space limit of its baseline + the budget
(so out-of-memory is real), and Ctrl-C kills the running trial with its process group.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

from rich.live import Live
from rich.table import Table

from batchpilot.cli._common import deprecated_alias, err_console, handle_errors, print_json
from batchpilot.cli._finetune import FinetuneOpt, with_finetune
from batchpilot.cli._options import (
    DEMO_MODEL,
    DEMO_SEQ_LEN,
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    count,
    duration,
    option,
    size,
    whole,
)
from batchpilot.cli._settings import (
    DEFAULTS,
    AttentionOpt,
    OptimizerOpt,
    RecomputeEveryOpt,
    RecomputeOpt,
    StepPrecisionOpt,
    settings_from_options,
    step_precision,
)
from batchpilot.errors import BatchpilotError
from batchpilot.measure.calibrate import check_calibration_accelerator_for, write_calibration
from batchpilot.measure.device import device_memory_bytes, resolve_device
from batchpilot.measure.probe import run_probe
from batchpilot.measure.probe_types import ProbeRequest, worst_case_seq_len
from batchpilot.records.probe import ProbeResult, ProbeTrial
from batchpilot.specs.model import load_model
from batchpilot.specs.settings import check_effective, validate_for_model
from batchpilot.units import format_bytes


def _read_lengths(path: Path) -> list[int]:
    """Sequence lengths from a file: whitespace/comma-separated integers or a JSON list."""
    from batchpilot.io import read_small_file  # regular files only, size-capped (never /dev/zero)

    text = read_small_file(path, "--lengths").decode("utf-8", errors="replace")
    try:
        return [int(tok) for tok in text.replace("[", " ").replace("]", " ").replace(",", " ").split()]
    except ValueError:
        raise BatchpilotError(f"--lengths {str(path)!r} must hold integers (one per line or a JSON list)") from None


class _Display:
    """Rich live table of the trials so far, plus the running one (stderr, so stdout stays clean)."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.rows: list[ProbeTrial] = []
        self.running: int | None = None
        self.started = time.monotonic()
        self.live = Live(self._table(), console=err_console, refresh_per_second=4, transient=False)

    def _table(self) -> Table:
        table = Table("#", "phase", "micro-batch", "fits", "peak", "tokens/s", "seconds", title=self.title)
        for i, t in enumerate(self.rows, 1):
            table.add_row(str(i), t.phase, str(t.micro_batch), "yes" if t.fits else "[red]no[/red]",
                          format_bytes(t.peak_bytes) if t.peak_bytes else "—",
                          f"{t.tokens_per_s:,.0f}" if t.tokens_per_s else "—", f"{t.seconds:.1f}")
        if self.running is not None:
            elapsed = time.monotonic() - self.started
            table.add_row(str(len(self.rows) + 1), "…", str(self.running), "[yellow]running[/yellow]", "", "",
                          f"{elapsed:.0f}")
        return table

    def __call__(self, event: str, micro_batch: int, trial: ProbeTrial | None) -> None:
        if event == "start":
            self.running, self.started = micro_batch, time.monotonic()
        else:
            self.running = None
            if trial is not None:
                self.rows.append(trial)
        self.live.update(self._table())


def _render(result: ProbeResult, calibration: Path | None) -> None:
    err_console.print(
        f"max micro-batch [bold]{result.max_micro_batch}[/bold] (predicted {result.predicted_max_micro_batch}; "
        f"{result.search_trials} search trials, {result.search_seconds:.1f} s), throughput knee "
        f"[bold]{result.knee_micro_batch}[/bold] (smallest within 3% of the best tokens/s), budget "
        f"{format_bytes(result.budget_bytes)} on {result.device}")
    if calibration is not None:
        err_console.print(f"calibration written to {calibration} (use: batchpilot plan --calibration {calibration})")


@handle_errors
def probe(
    model: ModelOpt = DEMO_MODEL,
    seq_len: Annotated[int, option("--seq-len", count("--seq-len"), help=(
        "Tokens per sequence (the data's worst case)."))] = DEMO_SEQ_LEN,
    lengths: Annotated[Path | None, option(
        "--lengths", help="File of the data's sequence lengths: the probe uses the longest (≤ --seq-len).")] = None,
    device: DeviceOpt = "auto",
    memory_budget: Annotated[int | None, option("--memory-budget", size("--memory-budget"), show_default=(
        "the device's memory; CPU: MemAvailable"), help="Memory the probe may use (e.g. 6GiB).")] = None,
    warmup_steps: Annotated[int, option("--warmup-steps", whole("--warmup-steps"), help=(
        "Untimed full steps first (the optimizer state exists before them)."))] = 1,
    timed_steps: Annotated[int, option("--timed-steps", whole("--timed-steps"), help=(
        "Timed full steps after them (warm-up + timed ≥ 2)."))] = 1,
    knee: Annotated[bool, option("--knee/--no-knee", help="Measure the halving ladder for the knee.")] = True,
    trial_timeout: Annotated[float, option("--trial-timeout", duration("--trial-timeout"), help=(
        "Per-trial wall-time limit (CPU trials): a trial past it is killed and counts as not fitting, "
        "e.g. 10m."))] = "30m",  # type: ignore[assignment]  # parsed by duration()
    calibration_out: Annotated[Path | None, option(
        "--calibration-out", help="Write a calibration file for `plan --calibration`.")] = None,
    gpu: Annotated[str | None, option("--gpu", metavar="NAME|FILE", help=(
        "The GPU the probe runs on, as a catalog name or JSON file (see `batchpilot hardware list`): the "
        "calibration divides by its peak FLOP/s (CUDA: required for --calibration-out; refused on CPU, where "
        "the calibration divides by this CPU's measured matmul rate)."))] = None,
    accelerator: Annotated[str | None, option("--accelerator", hidden=True, help="Old name of --gpu.")] = None,
    precision: StepPrecisionOpt = None, optimizer: OptimizerOpt = DEFAULTS.optimizer,
    recompute: RecomputeOpt = DEFAULTS.recompute, recompute_every: RecomputeEveryOpt = DEFAULTS.recompute_every,
    attention: AttentionOpt = DEFAULTS.attention,
    finetune: FinetuneOpt = "full",
    json_output: JsonOpt = False,
) -> None:
    """Find the largest micro-batch that really fits, tokens/s per size and the throughput knee.

    The steps run on one device, without model sharding (tensor, pipeline or ZeRO layouts are `plan`'s)."""
    gpu = deprecated_alias("--accelerator", accelerator, "--gpu", gpu)
    dev = resolve_device(device)
    settings = with_finetune(settings_from_options(precision=step_precision(precision, dev), optimizer=optimizer,
                                                   recompute=recompute, recompute_every=recompute_every,
                                                   attention=attention), finetune)
    check_effective(settings)
    spec = load_model(model)
    validate_for_model(settings, spec)  # before the live table starts
    if lengths is not None:
        seq_len = worst_case_seq_len(_read_lengths(lengths), cap=seq_len)
    budget = memory_budget or device_memory_bytes(dev)
    check_calibration_accelerator_for(dev, gpu)  # before any trial runs
    request = ProbeRequest(model=spec, settings=settings, seq_len=seq_len, device=dev, budget_bytes=budget,
                           warmup_steps=warmup_steps, timed_steps=timed_steps, knee=knee,
                           trial_timeout_s=trial_timeout)
    if json_output:
        result = run_probe(request)
    else:
        display = _Display(f"probe {spec.name}, seq {seq_len}, budget {format_bytes(budget)} on {dev}")
        with display.live:
            result = run_probe(request, progress=display)
    if os.environ.get("RANK", "0") != "0":  # under torchrun every rank probed in step; rank 0 reports
        return
    written = write_calibration(result, request, calibration_out, gpu) if calibration_out else None
    result = replace(result, calibration_file=str(written) if written else None)
    if json_output:
        print_json(result.to_dict())
    else:
        _render(result, written)
