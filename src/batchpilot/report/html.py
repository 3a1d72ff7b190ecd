"""A self-contained HTML report: opens offline, plots inlined as base64 PNGs, every value escaped.

``build_report(run_dir)`` writes ``report.html`` and ``plots/*.png`` into the run directory and returns
a :class:`ReportFiles` record. No value from a record reaches the page unescaped (configs and data
are user input).
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from batchpilot.records.plan import PlanRejection, PlanRow
from batchpilot.report.plots import PLOTS
from batchpilot.report.records import RunRecords, load_run
from batchpilot.units import format_bytes, format_count

PLOT_TITLES = {
    "memory": "Memory vs micro-batch (analytic, traced, measured)",
    "throughput": "Tokens/s vs micro-batch, with the knee",
    "noise": "Gradient noise scale / critical batch over steps",
    "loss": "Loss vs tokens and vs wall time",
}
PLAN_COLUMNS = ("micro_batch", "grad_accum", "dp", "tp", "pp", "vpp", "ep", "zero_stage", "recompute",
                "global_batch_sequences", "global_batch_tokens", "tokens_per_s", "mfu")

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:70rem;color:#222}
h1{font-size:1.6rem}h2{font-size:1.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;font-size:.85rem}td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}.plot img{max-width:100%;border:1px solid #eee}
pre{background:#f7f7f7;padding:.6rem;overflow-x:auto;font-size:.8rem}.missing{color:#a00}
.rationale{background:#eef6ee;padding:.6rem;border-left:4px solid #4a4}
"""


@dataclass(frozen=True, kw_only=True, slots=True)
class ReportFiles:
    """What the report wrote."""

    html_path: Path
    plot_paths: dict[str, Path]
    """Plot name → PNG; plots whose stage has no data are absent."""
    missing: tuple[str, ...]
    """Plots not drawn because their stage did not run."""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any) -> str:
    """Four significant digits for floats, thousands separators for integers."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _cell(key: str, value: Any) -> str:
    if isinstance(value, float):
        shown = f"{value:.3f}" if key == "mfu" else f"{value:,.1f}"
    elif isinstance(value, int) and not isinstance(value, bool):
        shown = f"{value:,}"
    else:
        shown = str(value)
    return f"<td>{_e(shown)}</td>"


def _plans_table(plans: tuple[PlanRow, ...]) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in PLAN_COLUMNS) + "<th>memory/GPU</th>"
    rows = []
    for plan in plans:
        row = plan.to_dict()
        rows.append("<tr>" + "".join(_cell(c, row[c]) for c in PLAN_COLUMNS)
                    + f"<td>{_e(format_bytes(plan.memory.total))}</td></tr>")
    return f"<div style='overflow-x:auto'><table><tr>{head}</tr>{''.join(rows)}</table></div>"


def _plan_section(records: RunRecords) -> str:
    plan = records.plan
    if plan is None:
        return "<h2>Plan</h2><p class='missing'>The plan stage did not run.</p>"
    parts = ["<h2>Chosen plan</h2>"]
    if plan.rationale:
        parts.append(f"<p class='rationale'>{_e(plan.rationale)}</p>")
    parts.append(_plans_table(plan.plans[:10]) if plan.plans else "<p class='missing'>No feasible plan.</p>")
    if plan.rejected:
        items = "".join(f"<li>{_e(_describe_rejected(r))}</li>" for r in plan.rejected[:30])
        parts.append(f"<h2>Rejected alternatives</h2><ul>{items}</ul>")
    return "".join(parts)


def _describe_rejected(row: PlanRejection) -> str:
    layout = ", ".join(f"{k}={v}" for k, v in row.to_dict().items() if k != "reason")
    return f"{layout}: {row.reason}"


def _summary_section(records: RunRecords) -> str:
    facts: list[tuple[str, str]] = []
    probe, summary = records.probe, records.summary
    if probe is not None:
        facts += [("device", probe.device), ("max micro-batch (measured)", str(probe.max_micro_batch)),
                  ("throughput knee", str(probe.knee_micro_batch)),
                  ("predicted max micro-batch", str(probe.predicted_max_micro_batch))]
    scale = records.noise_scale  # noise.json, else measured during the training run (train/noise_default.py)
    if scale is not None:
        tokens = records.noise.b_simple_tokens if records.noise else None
        facts.append(("critical batch ≈ B_simple",
                      f"{_number(scale[0])} sequences"
                      + (f" ({format_count(tokens)} tokens)" if tokens is not None and math.isfinite(tokens) else "")))
    if summary is not None:
        values = {"steps": summary.steps, "tokens": summary.tokens, "final_loss": summary.final_loss,
                  "val_loss": summary.val_loss, "tokens_per_s": summary.tokens_per_s,
                  "padding_fraction": summary.padding_fraction, "peak_memory_bytes": summary.peak_memory_bytes,
                  "elapsed_s": summary.elapsed_s}
        facts += [(f"verification run: {k}", format_bytes(v) if k.endswith("_bytes") else _number(v))
                  for k, v in values.items() if v is not None]
    rows = "".join(f"<tr><th class='l'>{_e(k)}</th><td class='l'>{_e(v)}</td></tr>" for k, v in facts)
    return f"<h2>Summary</h2><table>{rows}</table>" if rows else ""


def _stages_section(records: RunRecords) -> str:
    if records.tune is None or not records.tune.stages:
        return ""
    rows = "".join(
        f"<tr><td class='l'>{_e(s.name)}</td><td class='l'>{_e(s.status)}</td><td>{_e(s.seconds)}</td></tr>"
        for s in records.tune.stages
    )
    return f"<h2>Stages</h2><table><tr><th class='l'>stage</th><th class='l'>status</th><th>seconds</th></tr>{rows}</table>"


def _exports_section(records: RunRecords) -> str:
    if not records.exports:
        return ""
    blocks = "".join(f"<h3>{_e(name)}</h3><pre>{_e(text)}</pre>" for name, text in records.exports.items())
    return f"<h2>Exports</h2>{blocks}"


def _plot_block(name: str, path: Path | None) -> str:
    title = PLOT_TITLES[name]
    if path is None:
        return f"<h2>{_e(title)}</h2><p class='missing'>No data: this stage did not run.</p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f"<h2>{_e(title)}</h2><div class='plot' id='plot-{name}'>"
            f"<img alt='{_e(title)}' src='data:image/png;base64,{data}'></div>")


def _draw(draw: Any, records: RunRecords, path: Path) -> Path | None:
    """One plot; values matplotlib cannot lay out (records are user files) leave it out, not the report."""
    try:
        result: Path | None = draw(records, path)
        return result
    except (ValueError, OverflowError, TypeError):
        plt.close("all")
        path.unlink(missing_ok=True)
        return None


def build_report(run_dir: str | Path) -> ReportFiles:
    """Render ``RUN_DIR/report.html`` and ``RUN_DIR/plots/*.png`` from the run's records."""
    records = load_run(run_dir)
    plot_dir = records.run_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    drawn = {name: _draw(draw, records, plot_dir / f"{name}.png") for name, draw in PLOTS.items()}
    body = "".join([
        f"<h1>batchpilot report — {_e(records.run_dir.name)}</h1>",
        _summary_section(records),
        _plan_section(records),
        *(_plot_block(name, path) for name, path in drawn.items()),
        _stages_section(records),
        _exports_section(records),
    ])
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>batchpilot report</title>"
            f"<style>{_CSS}</style></head><body>{body}</body></html>")
    html_path = records.run_dir / "report.html"
    tmp = html_path.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(html_path)
    return ReportFiles(
        html_path=html_path,
        plot_paths={n: p for n, p in drawn.items() if p is not None},
        missing=tuple(n for n, p in drawn.items() if p is None),
    )
