"""How a plan and a run are shown to people — one presentation for the terminal, the HTML report and the web page
(:mod:`batchpilot.report.html` renders it; ``batchpilot plan`` prints :func:`plan_table`).

Each value keeps its raw number (what ``--json`` holds) beside the text shown, formatted as ``batchpilot
plan`` prints it: memory in GiB (2^30 bytes) to 0.1, step time to 3 significant digits, tokens/s as
``632K``/``1.25M``, MFU as a percentage. Labels say what a number is and its unit.

    >>> format_rate(632_400.0), format_rate(1_250_000.0), format_rate(8_491.0)
    ('632K', '1.25M', '8491')
    >>> layout_text(tp=1, pp=2, vpp=4, ep=1)
    '1·2v4·1'
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from batchpilot.records.plan import PlanRejection, PlanRow
from batchpilot.records.train_summary import TrainSummary
from batchpilot.report.records import RunRecords
from batchpilot.units import GIB, format_bytes, format_count


@dataclass(frozen=True, kw_only=True, slots=True)
class Column:
    """One column of a table."""

    key: str
    """Stable name (a ``data-key`` on the page)."""
    header: str
    """The terminal's short header (``GiB``)."""
    label: str
    """The human label with its unit (``memory per GPU (GiB)``)."""
    align: Literal["left", "right"] = "right"


@dataclass(frozen=True, kw_only=True, slots=True)
class Cell:
    """One shown value."""

    text: str
    """As shown."""
    value: float | int | str
    """The raw value of the record (bytes, seconds, tokens/s, a fraction)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Table:
    """Columns, rows of cells and a caption."""

    columns: tuple[Column, ...]
    rows: tuple[tuple[Cell, ...], ...]
    caption: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON for the page."""
        return {"columns": [{"key": c.key, "header": c.header, "label": c.label, "align": c.align}
                            for c in self.columns],
                "rows": [[{"text": c.text, "value": c.value} for c in row] for row in self.rows],
                "caption": self.caption}


@dataclass(frozen=True, kw_only=True, slots=True)
class Part:
    """One part of a breakdown (a bar segment)."""

    key: str
    label: str
    value: float
    """Bytes or seconds."""
    text: str
    """As shown, with its unit."""

    def to_dict(self) -> dict[str, Any]:
        """JSON for the page."""
        return {"key": self.key, "label": self.label, "value": self.value, "text": self.text}


def format_rate(per_s: float) -> str:
    """Tokens/s as the terminal shows them: ``1.25M``, ``632K`` (from 10,000), else whole."""
    return f"{per_s / 1e6:.2f}M" if per_s >= 1e6 else f"{per_s / 1e3:.0f}K" if per_s >= 1e4 else f"{per_s:.0f}"


def format_gib(num_bytes: float) -> str:
    """Bytes in GiB to 0.1 (the plan table's memory column)."""
    return f"{num_bytes / GIB:.1f}"


def format_seconds(seconds: float) -> str:
    """Seconds to 3 significant digits (the plan table's step time)."""
    return f"{seconds:.3g}"


def layout_text(*, tp: int, pp: int, vpp: int, ep: int) -> str:
    """``tp·pp(v)·ep``: ``1·2v4·1`` is tp 1, 2 pipeline stages with 4 virtual stages per rank, ep 1."""
    return f"{tp}·{pp}{f'v{vpp}' if vpp > 1 else ''}·{ep}"


_TRIAD = Column(key="triad", header="m×acc×dp", label="micro-batch × accumulation × data-parallel", align="left")
_LAYOUT = Column(key="layout", header="tp·pp(v)·ep", label="tensor · pipeline (virtual) · expert parallel",
                 align="left")
_ZERO = Column(key="zero_stage", header="ZeRO", label="ZeRO stage")
_RECOMPUTE = Column(key="recompute", header="recompute", label="recompute", align="left")
_MEMORY = Column(key="memory", header="GiB", label="memory per GPU (GiB)")
_STEP = Column(key="step_time_s", header="step s", label="step time (s)")
_RATE = Column(key="tokens_per_s", header="tokens/s", label="tokens/s (whole job)")
_TFLOPS = Column(key="tflops_per_gpu", header="TFLOP/s", label="TFLOP/s per GPU")
_DEVIATION = Column(key="deviation", header="Δ batch", label="global batch vs target")
_MFU = Column(key="mfu", header="MFU", label="MFU (model FLOPs utilisation)")


def plan_table(plans: tuple[PlanRow, ...]) -> Table:
    """The ranked plans as ``batchpilot plan`` prints them; the Δ batch column replaces TFLOP/s when a plan's
    global batch deviates from the target (the terminal table stays within 80 columns)."""
    deviates = any(p.deviation for p in plans)
    columns = (_TRIAD, _LAYOUT, _ZERO, _RECOMPUTE, _MEMORY, _STEP, _RATE, _DEVIATION if deviates else _TFLOPS, _MFU)
    rows = tuple(_plan_cells(p, deviates) for p in plans)
    return Table(columns=columns, rows=rows, caption="ranked by tokens/s (whole job); memory and TFLOP/s per GPU")


def _plan_cells(p: PlanRow, deviates: bool) -> tuple[Cell, ...]:
    triad = f"{p.micro_batch}×{p.grad_accum}×{p.dp}"
    extra = (Cell(text=f"{p.deviation:+.2%}", value=p.deviation) if deviates
             else Cell(text=f"{p.tflops_per_gpu:.0f}", value=p.tflops_per_gpu))
    return (Cell(text=triad, value=triad), Cell(text=layout_text(tp=p.tp, pp=p.pp, vpp=p.vpp, ep=p.ep),
                                                 value=layout_text(tp=p.tp, pp=p.pp, vpp=p.vpp, ep=p.ep)),
            Cell(text=str(p.zero_stage), value=p.zero_stage), Cell(text=p.recompute, value=p.recompute),
            Cell(text=format_gib(p.memory.total), value=p.memory.total),
            Cell(text=format_seconds(p.step_time_s), value=p.step_time_s),
            Cell(text=format_rate(p.tokens_per_s), value=p.tokens_per_s), extra,
            Cell(text=f"{p.mfu:.1%}", value=p.mfu))


MEMORY_PARTS = (("weights", "weights"), ("gradients", "gradients"), ("optimizer", "optimizer states"),
                ("activations", "activations"), ("overhead", "overhead (CUDA context, allocator, buffers)"))


def memory_parts(row: PlanRow) -> tuple[Part, ...]:
    """Per-GPU memory of a plan by term, in binary units as ``memory`` prints them (they add up to its total)."""
    return tuple(Part(key=key, label=label, value=getattr(row.memory, key),
                      text=format_bytes(getattr(row.memory, key))) for key, label in MEMORY_PARTS)


STEP_PARTS = (
    ("compute_gemm_s", "matrix multiplies"), ("compute_attention_s", "attention"),
    ("compute_elementwise_s", "element-wise ops"), ("compute_loss_s", "loss (logits)"),
    ("compute_fp8_cast_s", "FP8 casts"), ("compute_moe_routing_s", "MoE routing"),
    ("compute_launch_s", "kernel launches"), ("bubble_s", "pipeline bubble"),
    ("exposed_tp_s", "tensor-parallel communication"), ("exposed_cp_s", "context-parallel communication"),
    ("exposed_ep_s", "expert-parallel communication"), ("exposed_pp_s", "pipeline communication"),
    ("exposed_dp_s", "data-parallel communication (not overlapped)"), ("optimizer_s", "optimizer step"),
)
"""The parts of a step on its critical path, in the step-time model's own keys (``StepTime.to_dict``)."""

_COARSE = (("compute_s", "compute"), ("bubble_s", "pipeline bubble"), ("tp_comm_s", "tensor-parallel communication"),
           ("ep_comm_s", "expert-parallel communication"), ("pp_comm_s", "pipeline communication"),
           ("dp_exposed_s", "data-parallel communication (not overlapped)"), ("optimizer_s", "optimizer step"))
"""The parts when the step record has no per-kernel split."""


def step_parts(row: PlanRow) -> tuple[Part, ...]:
    """The step time of a plan by part, in seconds (non-zero parts; any remainder is ``other``)."""
    step: dict[str, Any] = dict(row.step)
    parts = STEP_PARTS if "compute_gemm_s" in step else _COARSE
    found = [Part(key=k, label=label, value=float(step[k]), text=f"{format_seconds(float(step[k]))} s")
             for k, label in parts if isinstance(step.get(k), (int, float)) and step[k] > 0]
    rest = row.step_time_s - sum(p.value for p in found)
    if rest > 1e-3 * row.step_time_s:
        found.append(Part(key="other", label="other", value=rest, text=f"{format_seconds(rest)} s"))
    return tuple(found)


def rejected_rows(rejected: tuple[PlanRejection, ...]) -> Table:
    """The layouts that produced no plan, each with why."""
    columns = (_LAYOUT, Column(key="dp", header="dp", label="data-parallel"), _ZERO, _RECOMPUTE,
               Column(key="kind", header="kind", label="rejected because", align="left"),
               Column(key="reason", header="why", label="why", align="left"))
    kinds = {"memory": "does not fit", "batch": "cannot reach the batch"}
    rows = tuple((Cell(text=layout_text(tp=r.tp, pp=r.pp, vpp=r.vpp, ep=r.ep), value=r.tp),
                  Cell(text=str(r.dp), value=r.dp), Cell(text=str(r.zero_stage), value=r.zero_stage),
                  Cell(text=r.recompute, value=r.recompute), Cell(text=kinds.get(r.kind, r.kind), value=r.kind),
                  Cell(text=r.reason, value=r.reason)) for r in rejected)
    return Table(columns=columns, rows=rows)


# ------------------------------------------------------------------------------------------ a run
def format_number(value: float) -> str:
    """A measured quantity for people: thousands separated, 3 significant digits below 1,000
    (``22,570``, ``2.26``, ``0.738``), never exponent notation for a value a run can produce."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"


def format_duration(seconds: float) -> str:
    """``42.1 s``, ``2 min 21 s``, ``1 h 05 min``."""
    if not math.isfinite(seconds) or seconds < 60:
        return f"{seconds:.3g} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def _sequences(value: float) -> str:
    return f"{format_number(value)} sequence{'' if value == 1 else 's'}"


@dataclass(frozen=True, kw_only=True, slots=True)
class Fact:
    """One labelled value of a run summary."""

    label: str
    text: str

    def to_dict(self) -> dict[str, str]:
        """JSON for the page."""
        return {"label": self.label, "text": self.text}


def run_facts(records: RunRecords) -> tuple[Fact, ...]:
    """The summary of a run: the probe's sizes, the critical batch and the verification run, labelled."""
    facts: list[Fact] = []
    probe, summary = records.probe, records.summary
    if probe is not None:
        facts += [Fact(label="device", text=probe.device),
                  Fact(label="largest micro-batch that fits (measured)", text=_sequences(probe.max_micro_batch)),
                  Fact(label="largest micro-batch that fits (predicted)",
                       text=_sequences(probe.predicted_max_micro_batch)),
                  Fact(label="throughput knee (smallest micro-batch within 3% of the best tokens/s)",
                       text=_sequences(probe.knee_micro_batch))]
    scale = records.noise_scale
    if scale is not None:
        tokens = records.noise.b_simple_tokens if records.noise else None
        shown = _sequences(scale[0]) + (f" ({format_count(tokens)} tokens)"
                                        if tokens is not None and math.isfinite(tokens) else "")
        facts.append(Fact(label="critical batch ≈ B_simple (gradient noise scale)", text=shown))
    if summary is not None:
        facts += _summary_facts(summary)
    return tuple(facts)


def _summary_facts(s: TrainSummary) -> list[Fact]:
    """The verification run, formatted as ``batchpilot train`` prints its summary."""
    run = "verification run"
    values: list[tuple[str, str | None]] = [
        ("optimizer steps", format_number(s.steps)),
        ("tokens trained", format_count(s.tokens)),
        ("final training loss (nats/token)", f"{s.final_loss:.4f}" if s.final_loss is not None else None),
        ("final validation loss (nats/token)", f"{s.val_loss:.4f}" if s.val_loss is not None else None),
        ("throughput (tokens/s)", format_count(s.tokens_per_s) if s.tokens_per_s is not None else None),
        ("padding (share of tokens)", f"{s.padding_fraction:.1%}" if s.padding_fraction is not None else None),
        ("peak memory", format_bytes(s.peak_memory_bytes)),
        ("wall time", format_duration(s.elapsed_s)),
    ]
    return [Fact(label=f"{run}: {label}", text=text) for label, text in values if text is not None]


STAGE_COLUMNS = (Column(key="stage", header="stage", label="stage", align="left"),
                 Column(key="status", header="status", label="status", align="left"),
                 Column(key="seconds", header="s", label="time"))


def stages_table(records: RunRecords) -> Table:
    """The tune stages: name, status and time."""
    stages = records.tune.stages if records.tune is not None else ()
    rows = tuple((Cell(text=s.name, value=s.name), Cell(text=s.status, value=s.status),
                  Cell(text=format_duration(s.seconds), value=s.seconds)) for s in stages)
    return Table(columns=STAGE_COLUMNS, rows=rows)
