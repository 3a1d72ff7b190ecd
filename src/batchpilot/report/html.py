"""The HTML of a run's report and of a plan, for the static report and the web page alike.

``build_report(run_dir)`` writes ``report.html`` (self-contained: opens offline, plots inlined as base64 PNGs)
and ``plots/*.png`` into the run directory and returns a :class:`ReportFiles` record; :func:`report_body`
is the same report as a fragment (the page shows a run folder with it) and :func:`plan_html` one plan (the
page's planner shows it). The values, labels and number formats come from :mod:`batchpilot.report.present`,
the look from ``present.css`` (inlined here, served to the page): one presentation. No value from a record
reaches the page unescaped (configs and data are user input); tables and code wrap to the page's width.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchpilot.records.plan import PlanRecord
from batchpilot.report.present import (
    Fact,
    Part,
    Table,
    format_gib,
    format_seconds,
    memory_parts,
    plan_table,
    rejected_rows,
    run_facts,
    stages_table,
    step_parts,
)
from batchpilot.report.records import RunRecords, load_run
from batchpilot.units import format_count

CSS_PATH = Path(__file__).with_name("present.css")
"""The presentation's style sheet (the page serves the same file)."""
_REPORT_CSS = "body{max-width:76rem;margin:1.5rem auto;padding:0 1.2rem}"

PLOT_TITLES = {
    "memory": "Peak memory per GPU vs micro-batch: predicted and measured",
    "throughput": "Throughput vs micro-batch, with the knee",
    "noise": "Critical batch (gradient noise scale) over training steps",
    "loss": "Loss of the verification run, vs tokens and vs wall time",
}
PLOT_CAPTIONS = {
    "memory": "Each measured point is one real training step at that micro-batch; lines are the analytic and the "
              "traced (the real module under fake tensors) predictions. A micro-batch fits when its peak stays "
              "under the memory budget (dashed); crosses mark sizes that ran out of memory.",
    "throughput": "Tokens per second of real steps at each micro-batch. The knee (star) is the smallest "
                  "micro-batch within 3% of the best throughput: larger ones only cost memory.",
    "noise": "B_simple estimates the critical batch (McCandlish et al. 2018): below it, a larger batch cuts the "
             "steps needed almost proportionally; above it, extra samples per step buy little. It grows as the "
             "loss falls.",
    "loss": "Training loss (and validation loss where measured) of the short run with the chosen plan: it "
            "should fall; the right panel shows the same run against wall-clock time.",
}
COLORS = ("#4477aa", "#66ccee", "#228833", "#ccbb44", "#ee6677", "#aa3377", "#bbbbbb", "#332288", "#88ccee",
          "#44aa99", "#999933", "#882255", "#117733", "#dd7788", "#555555")
"""Paul Tol's qualitative colours (distinguishable by colour-blind readers), then greys."""


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


def _id(value: str | None) -> str:
    return f" id='{_e(value)}'" if value else ""


# ---------------------------------------------------------------------------------------------- pieces
def table_html(table: Table, *, table_id: str | None = None) -> str:
    """A table whose numeric cells carry their raw value (``data-value``, as in ``--json``) beside the text shown."""
    def cls(align: str) -> str:
        return " class='l'" if align == "left" else ""

    def raw(value: float | int | str) -> str:  # numbers only: text is shown as it is
        return f" data-value='{value!r}'" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""

    head = "".join(f"<th scope='col'{cls(c.align)} title='{_e(c.header)}'>{_e(c.label)}</th>" for c in table.columns)
    rows = "".join(
        f"<tr data-row='{i}'>" + "".join(
            f"<td{cls(c.align)} data-key='{_e(c.key)}'{raw(cell.value)}>{_e(cell.text)}</td>"
            for c, cell in zip(table.columns, row, strict=True)) + "</tr>"
        for i, row in enumerate(table.rows))
    caption = f"<caption>{_e(table.caption)}</caption>" if table.caption else ""
    return (f"<div class='bp-table-wrap'><table class='bp-table'{_id(table_id)}>{caption}<thead><tr>{head}</tr>"
            f"</thead><tbody>{rows}</tbody></table></div>")


def facts_html(facts: tuple[Fact, ...]) -> str:
    """Labelled values as a two-column table."""
    rows = "".join(f"<tr><th scope='row'>{_e(f.label)}</th><td>{_e(f.text)}</td></tr>" for f in facts)
    return f"<table class='bp-facts'><tbody>{rows}</tbody></table>"


def bars_html(parts: tuple[Part, ...], *, title: str, total: str = "", limit: float | None = None,
              limit_text: str = "", chart_id: str | None = None) -> str:
    """One stacked bar of ``parts`` (each named, with its share, in the legend); ``limit`` draws a dashed line."""
    width = 1000.0
    whole = sum(p.value for p in parts)
    scale = max(whole, limit or 0.0) or 1.0
    shapes, x = [], 0.0
    for i, p in enumerate(parts):
        w = max(p.value, 0.0) / scale * width
        shapes.append(f"<rect x='{x:.2f}' y='6' width='{w:.2f}' height='32' fill='{COLORS[i % len(COLORS)]}' "
                      f"data-key='{_e(p.key)}'><title>{_e(p.label)}: {_e(p.text)}</title></rect>")
        x += w
    if limit:
        lx = limit / scale * width
        shapes.append(f"<line x1='{lx:.2f}' x2='{lx:.2f}' y1='0' y2='44' stroke='#000' stroke-width='3' "
                      f"stroke-dasharray='6 4'><title>{_e(limit_text)}</title></line>")
    label = f"{title}: {total}" if total else title
    legend = "".join(
        f"<li data-key='{_e(p.key)}' data-value='{p.value!r}'><span class='swatch' aria-hidden='true' "
        f"style='background:{COLORS[i % len(COLORS)]}'></span>{_e(p.label)}: {_e(p.text)} "
        f"({p.value / (whole or 1.0):.0%})</li>" for i, p in enumerate(parts))
    note = f"<p class='hint'>dashed line: {_e(limit_text)}</p>" if limit_text else ""
    return (f"<figure class='bp-chart'{_id(chart_id)}><figcaption>{_e(title)}"
            + (f"<span class='total'> — {_e(total)}</span>" if total else "") + "</figcaption>"
            f"<svg class='bp-bar' viewBox='0 0 1000 44' preserveAspectRatio='none' role='img' "
            f"aria-label='{_e(label)}'>{''.join(shapes)}</svg>{note}"
            f"<ul class='bp-legend'>{legend}</ul></figure>")


def code_html(name: str, text: str) -> str:
    """A file's text (an export), wrapped to the page's width rather than cut off at its edge."""
    return f"<figure class='bp-code'><figcaption>{_e(name)}</figcaption><pre>{_e(text)}</pre></figure>"


# ---------------------------------------------------------------------------------------------- a plan
def plan_html(record: PlanRecord, *, rejected_open: bool = False) -> str:
    """One plan: what was asked, the winner and why, the ranked plans, the winner's memory per GPU and step
    time by part, and the rejected layouts with why."""
    c, t = record.cluster, record.target
    parts = [f"<h3 id='plan-title'>{_e(record.model)} on {_e(c.get('total_devices'))} × {_e(c.get('accelerator'))} "
             f"({_e(c.get('devices_per_node'))} per node), seq {record.seq_len}</h3>",
             f"<p class='target'>target {t.global_batch_sequences:.6g} sequences = "
             f"{format_count(t.global_batch_tokens)} tokens per optimizer step"
             + (f" — {_e(t.source)}" if t.source else "") + "</p>"]
    parts += [f"<p class='warning'>warning: {_e(w)}</p>" for w in record.warnings or ()]
    if record.rationale:
        parts.append(f"<p class='rationale' id='rationale'><strong>winner: </strong>{_e(record.rationale)}</p>")
    if record.cost is not None:
        parts.append(f"<p class='cost' id='cost'><strong>time and cost: </strong>{_e(record.cost.summary())}</p>")
    if not record.plans:
        return "".join([*parts, "<p class='missing'>No feasible plan.</p>"])
    parts.append(table_html(plan_table(record.plans), table_id="plan-table"))
    best = record.plans[0]
    parts.append(bars_html(memory_parts(best), title="Memory per GPU of the winner, by term",
                           total=f"{format_gib(best.memory.total)} GiB", limit=record.budget_bytes,
                           limit_text=f"{format_gib(record.budget_bytes)} GiB usable per GPU "
                                      f"({record.headroom:.0%} kept free)", chart_id="memory-chart"))
    parts.append(bars_html(step_parts(best), title="Step time of the winner, by part (critical path)",
                           total=f"{format_seconds(best.step_time_s)} s per optimizer step", chart_id="step-chart"))
    if record.rejected:
        shown = f" (the first {len(record.rejected)})" if len(record.rejected) < record.rejected_total else ""
        parts.append(f"<details id='rejected'{' open' if rejected_open else ''}><summary>{record.rejected_total} "
                     f"layouts rejected, each with why{shown}</summary>"
                     f"{table_html(rejected_rows(record.rejected), table_id='rejected-table')}</details>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------- a run
def _summary_section(records: RunRecords) -> str:
    facts = run_facts(records)
    return f"<h2>Summary</h2>{facts_html(facts)}" if facts else ""


def _plan_section(records: RunRecords) -> str:
    if records.plan is None:
        return "<h2>Plan</h2><p class='missing'>The plan stage did not run.</p>"
    cluster = records.plan.cluster_plan
    target = ("<h2 id='cluster-plan'>Cluster plan</h2>"
              + (f"<p class='target'>{_e(cluster.target_source)}</p>" if cluster.target_source else "")
              + plan_html(cluster)) if cluster is not None else ""
    return f"<h2>Chosen plan</h2>{plan_html(records.plan, rejected_open=True)}{target}"


def _stages_section(records: RunRecords) -> str:
    table = stages_table(records)
    return f"<h2>Stages</h2>{table_html(table)}" if table.rows else ""


def _exports_section(records: RunRecords) -> str:
    if not records.exports:
        return ""
    return "<h2>Exports</h2>" + "".join(code_html(name, text) for name, text in records.exports.items())


def _plot_block(name: str, png: bytes | None) -> str:
    title = PLOT_TITLES[name]
    if png is None:
        return f"<h2>{_e(title)}</h2><p class='missing'>No data: this stage did not run.</p>"
    data = base64.b64encode(png).decode("ascii")
    return (f"<h2>{_e(title)}</h2><figure class='plot' id='plot-{name}'>"
            f"<img alt='{_e(title)}' src='data:image/png;base64,{data}'>"
            f"<figcaption class='hint'>{_e(PLOT_CAPTIONS[name])}</figcaption></figure>")


def report_body(records: RunRecords, plots: Mapping[str, bytes | None]) -> str:
    """The report of a run as an HTML fragment; ``plots`` maps each plot name to its PNG (None: not drawn)."""
    return "".join([
        f"<h1>batchpilot report — {_e(records.run_dir.name)}</h1>",
        _summary_section(records),
        _plan_section(records),
        *(_plot_block(name, png) for name, png in plots.items()),
        _stages_section(records),
        _exports_section(records),
    ])


def draw_plots(records: RunRecords, folder: Path) -> dict[str, Path | None]:
    """Every plot of the run as a PNG in ``folder`` (None where its stage has no data or values cannot be drawn)."""
    from batchpilot.report.plots import PLOTS, draw  # matplotlib: imported only where plots are drawn

    folder.mkdir(parents=True, exist_ok=True)
    return {name: draw(plot, records, folder / f"{name}.png") for name, plot in PLOTS.items()}


def page_html(body: str, *, title: str = "batchpilot report") -> str:
    """A self-contained page around ``body`` (the style sheet inlined)."""
    css = CSS_PATH.read_text(encoding="utf-8")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{_e(title)}</title>"
            f"<style>{css}{_REPORT_CSS}</style></head><body>{body}</body></html>")


def build_report(run_dir: str | Path) -> ReportFiles:
    """Render ``RUN_DIR/report.html`` and ``RUN_DIR/plots/*.png`` from the run's records."""
    records = load_run(run_dir)
    drawn = draw_plots(records, records.run_dir / "plots")
    body = report_body(records, {n: p.read_bytes() if p is not None else None for n, p in drawn.items()})
    html_path = records.run_dir / "report.html"
    tmp = html_path.with_suffix(".html.tmp")
    tmp.write_text(page_html(body), encoding="utf-8")
    tmp.replace(html_path)
    return ReportFiles(
        html_path=html_path,
        plot_paths={n: p for n, p in drawn.items() if p is not None},
        missing=tuple(n for n, p in drawn.items() if p is None),
    )
