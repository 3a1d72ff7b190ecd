"""The report's plots, drawn with matplotlib's Agg backend into PNG files.

Each function takes a run's records, writes one PNG and returns its path, or returns ``None`` when the
stage that feeds it has no data (the HTML then says so instead of showing an empty frame).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from batchpilot.records.probe import ProbeResult, ProbeTrial
from batchpilot.report.records import RunRecords
from batchpilot.units import GIB

DPI = 110
FIGSIZE_IN = (6.4, 3.8)


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, facecolor="white")
    plt.close(fig)
    return path


PLOTTABLE = 1e18
"""Largest magnitude drawn: records are user files, and matplotlib cannot lay out ticks near 1e308."""


def _plottable(value: Any) -> bool:
    """A real, finite number of a size a plot can show (bools, strings, None and NaN are not)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and abs(value) <= PLOTTABLE)


def _pairs(rows: list[dict[str, Any]], x: str, y: str) -> list[tuple[float, float]]:
    """(x, y) of the metrics rows where both are plottable: kept together, so a row missing one drops both."""
    return [(r[x], r[y]) for r in rows if _plottable(r.get(x)) and _plottable(r.get(y))]


def _trials(probe: ProbeResult | None) -> list[ProbeTrial]:
    """The probe's trials whose micro-batch can be drawn."""
    return [t for t in (probe.trials if probe else ()) if _plottable(t.micro_batch)]


def _fitting_trials(probe: ProbeResult | None) -> list[ProbeTrial]:
    return sorted((t for t in _trials(probe) if t.fits), key=lambda t: t.micro_batch)


def plot_memory(records: RunRecords, path: Path) -> Path | None:
    """Peak memory (GiB) vs micro-batch: analytic, traced and measured, with the budget line."""
    curve = records.memory_curve
    measured = [t for t in _fitting_trials(records.probe) if _plottable(t.peak_bytes)]
    if curve is None and not measured:
        return None
    fig, ax = plt.subplots(figsize=FIGSIZE_IN)
    if curve is not None:
        for values, style, label in ((curve.analytic, "-o", "predicted: analytic model"),
                                     (curve.traced, "-s", "predicted: traced (fake tensors)")):
            pairs = [(m, v) for m, v in zip(curve.micro_batches, values, strict=False)
                     if v is not None and _plottable(m) and _plottable(v)]
            if pairs:
                ax.plot([m for m, _ in pairs], [v / GIB for _, v in pairs], style, label=label, markersize=4)
    if measured:
        ax.plot([t.micro_batch for t in measured], [(t.peak_bytes or 0) / GIB for t in measured], "D",
                color="black", label="measured (probe)", markersize=6)
    failed = [t.micro_batch for t in _trials(records.probe) if not t.fits]
    budget = records.probe.budget_bytes if records.probe else None
    if _plottable(budget) and budget:
        ax.axhline(budget / GIB, color="red", linestyle="--", linewidth=1,
                   label=f"memory budget {budget / GIB:.2f} GiB")
        if failed:
            ax.plot(failed, [budget / GIB] * len(failed), "x", color="red", markersize=8,
                    label="out of memory (measured)")
    ax.set_xlabel("micro-batch (sequences)")
    ax.set_ylabel("peak memory (GiB)")
    ax.set_title("Peak memory vs micro-batch")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_throughput(records: RunRecords, path: Path) -> Path | None:
    """Measured tokens/s vs micro-batch with the throughput knee marked."""
    points = [(t.micro_batch, t.tokens_per_s) for t in _fitting_trials(records.probe)
              if t.tokens_per_s is not None and _plottable(t.tokens_per_s)]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=FIGSIZE_IN)
    ax.plot([b for b, _ in points], [tps for _, tps in points], "-o", label="measured (one real step per size)")
    knee = records.probe.knee_micro_batch if records.probe else None
    at_knee = [(b, tps) for b, tps in points if b == knee]
    if at_knee:
        ax.plot([at_knee[0][0]], [at_knee[0][1]], "*", color="orange", markersize=16,
                label=f"knee: micro-batch {knee} (within 3% of the best)")
    ax.set_xlabel("micro-batch (sequences)")
    ax.set_ylabel("tokens/s (whole step)")
    ax.yaxis.set_major_formatter(EngFormatter())  # 8.5k, not 8500.0
    ax.set_title("Throughput vs micro-batch")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _noise_points(records: RunRecords) -> tuple[list[tuple[float, float]], bool]:
    """(step, B_simple) from ``noise --json``'s trajectory, else from the training run's ``metrics.jsonl``
    (the runner measures it by default, ``train/noise_default.py``); True when they come from the run."""
    if records.noise is not None:
        points = [(float(p.step), float(p.b_simple)) for p in records.noise.trajectory
                  if p.b_simple is not None and _plottable(p.step) and _plottable(p.b_simple)]
        if points:
            return points, False
    return _pairs(records.metrics, "step", "b_simple"), True


def plot_noise(records: RunRecords, path: Path) -> Path | None:
    """B_simple (sequences) over optimizer steps, with the uncertainty band; for a training run, the per-step
    95% band and the training loss on a second axis (B_simple grows as the loss falls, McCandlish et al. 2018)."""
    points, from_run = _noise_points(records)
    scale = records.noise_scale
    final = scale[0] if scale and _plottable(scale[0]) else None
    band = scale[1] if scale else None
    if not points and final is None:
        return None
    fig, ax = plt.subplots(figsize=FIGSIZE_IN)
    if points:
        ax.plot([x for x, _ in points], [y for _, y in points], "-", label="B_simple estimate (running average)")
    rows = [r for r in records.metrics if all(_plottable(r.get(k)) for k in ("step", "b_simple_lo", "b_simple_hi"))]
    if from_run and rows:
        ax.fill_between([r["step"] for r in rows], [r["b_simple_lo"] for r in rows], [r["b_simple_hi"] for r in rows],
                        color="tab:blue", alpha=0.15, label="95% band")
    elif band is not None and all(_plottable(b) for b in band):
        ax.axhspan(band[0], band[1], color="tab:blue", alpha=0.15, label="band")
    if final is not None:
        ax.axhline(final, color="tab:blue", linestyle="--", linewidth=1, label=f"final B_simple = {final:.3g} sequences")
    values = [y for _, y in points]
    if values and min(values) > 0 and max(values) / min(values) > 30:  # early estimates from few steps vary widely
        ax.set_yscale("log")
    if from_run:
        loss = _pairs(records.metrics, "step", "loss")
        if loss:
            twin = ax.twinx()
            twin.plot([x for x, _ in loss], [y for _, y in loss], "-", color="grey", alpha=0.6, linewidth=1)
            twin.set_ylabel("training loss (grey)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("critical batch ≈ B_simple (sequences)")
    ax.set_title("Critical batch ≈ gradient noise scale B_simple")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_loss(records: RunRecords, path: Path) -> Path | None:
    """Training loss vs tokens and vs wall-clock time (validation loss where logged)."""
    rows = [m for m in records.metrics if _plottable(m.get("loss"))]
    if not rows:
        return None
    fig, (by_tokens, by_time) = plt.subplots(1, 2, figsize=(FIGSIZE_IN[0] * 1.6, FIGSIZE_IN[1]))
    for ax, key, label in ((by_tokens, "tokens", "tokens trained"), (by_time, "elapsed_s", "wall time (s)")):
        pairs = _pairs(rows, key, "loss")
        ax.plot([p[0] for p in pairs], [p[1] for p in pairs], "-", label="training loss")
        val = _pairs(records.metrics, key, "val_loss")
        if val:
            ax.plot([p[0] for p in val], [p[1] for p in val], "o", label="validation loss")
        ax.set_xlabel(label)
        ax.xaxis.set_major_formatter(EngFormatter())  # 200k, 1.5M: tick labels that do not collide
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Verification run: loss of the chosen plan")
    return _save(fig, path)


PLOTS = {
    "memory": plot_memory,
    "throughput": plot_throughput,
    "noise": plot_noise,
    "loss": plot_loss,
}


def draw(plot: Callable[[RunRecords, Path], Path | None], records: RunRecords, path: Path) -> Path | None:
    """One plot; values matplotlib cannot lay out (records are user files) leave it out, not the report."""
    try:
        return plot(records, path)
    except (ValueError, OverflowError, TypeError):
        plt.close("all")
        path.unlink(missing_ok=True)
        return None
