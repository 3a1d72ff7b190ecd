"""Traced (fake-tensor) peak memory vs the measured CPU allocator peak, and the analytic model beside both.

Run: ``.venv/bin/python -m benchmarks.traced_accuracy`` (a few minutes on 2 cores) — writes
``benchmarks/results/traced_accuracy.json`` and ``.md``. ``--quick`` runs one preset and two rows.

For each tiny preset × micro-batch × precision (fp32, bf16; SDPA attention, AdamW with torch's CPU
default ``foreach=False``, no recompute), it records:

- ``measured_bytes``: :func:`batchpilot.measure.cpu_peak.measure_cpu_step_peak`, two real iterations,
  the CPU allocator's peak from the torch profiler;
- ``traced_bytes`` and ``trace_wall_s``: :func:`batchpilot.estimate.traced.trace_step` on the same step;
- ``analytic_bytes``: :func:`batchpilot.estimate.memory.analytic_memory` with its CPU overhead model (no
  CUDA context, workspace or fragmentation), when that module is importable;
- FLOPs of one step, traced and ``ModelSpec.flops_per_token(seq) × tokens``.

Then one trace of the ``llama-2-7b`` shape at micro-batch 1, sequence 2048, bf16, in a fresh process
whose wall time and peak RSS (``ru_maxrss``) are recorded: the trace's speed and real-memory cost.
"""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from batchpilot.estimate.traced import peak_error, trace_step
from batchpilot.measure.cpu_peak import measure_cpu_step_peak
from batchpilot.specs.model import ModelSpec, load_model
from batchpilot.specs.settings import RunSettings

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 2**30

#: (preset, sequence length, micro-batches)
GRID: list[tuple[str, int, list[int]]] = [
    ("tiny-llama-1m", 256, [1, 2, 4, 8]),
    ("tiny-llama-15m", 256, [1, 2, 4]),
]
PRECISIONS = ("fp32", "bf16")
BIG_MODEL, BIG_SEQ = "llama-2-7b", 2048


def _analytic(spec: ModelSpec, settings: RunSettings, micro_batch: int, seq_len: int) -> int | None:
    try:
        from batchpilot.estimate.memory import OverheadModel, analytic_memory
    except ImportError:
        return None
    return analytic_memory(spec, settings, micro_batch=micro_batch, seq_len=seq_len,
                           overhead=OverheadModel.cpu()).total_bytes


def accuracy_row(preset: str, precision: str, micro_batch: int, seq_len: int) -> dict[str, Any]:
    spec, settings = load_model(preset), RunSettings(precision=precision, attention="flash")  # type: ignore[arg-type]
    traced = trace_step(spec, settings, micro_batch=micro_batch, seq_len=seq_len)
    measured = measure_cpu_step_peak(spec, settings, micro_batch=micro_batch, seq_len=seq_len)
    analytic = _analytic(spec, settings, micro_batch, seq_len)
    spec_flops = spec.flops_per_token(seq_len) * micro_batch * seq_len
    return {
        "preset": preset, "precision": precision, "micro_batch": micro_batch, "seq_len": seq_len,
        "measured_bytes": measured,
        "traced_bytes": traced.memory.total_bytes,
        "traced_error": peak_error(traced.memory.total_bytes, measured),
        "analytic_bytes": analytic,
        "analytic_error": None if analytic is None else peak_error(analytic, measured),
        "analytic_vs_traced": None if analytic is None else peak_error(analytic, traced.memory.total_bytes),
        "traced_memory": traced.memory.to_dict(),
        "trace_wall_s": round(traced.wall_s, 2),
        "traced_flops": traced.flops,
        "spec_flops": spec_flops,
        "flops_ratio": traced.flops / spec_flops,
    }


def big_model_timing() -> dict[str, Any]:
    """Trace the 7B shape once in a fresh process; its wall time and peak RSS."""
    code = (
        "import json, resource, time\n"
        "from batchpilot.specs.model import load_model\n"
        "from batchpilot.specs.settings import RunSettings\n"
        "from batchpilot.estimate.traced import trace_step\n"
        "t = time.perf_counter()\n"
        f"r = trace_step(load_model({BIG_MODEL!r}), RunSettings(precision='bf16'), micro_batch=1, "
        f"seq_len={BIG_SEQ}, count_flops=False)\n"
        "print(json.dumps({'memory': r.memory.to_dict(), 'trace_wall_s': r.wall_s,"
        " 'process_wall_s': time.perf_counter() - t,"
        " 'max_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))\n"
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    record = json.loads(out.strip().splitlines()[-1])
    record.update(model=BIG_MODEL, seq_len=BIG_SEQ, micro_batch=1, precision="bf16",
                  with_interpreter_and_imports_s=round(time.perf_counter() - start, 1))
    record["analytic_bytes"] = _analytic(load_model(BIG_MODEL), RunSettings(precision="bf16"), 1, BIG_SEQ)
    if record["analytic_bytes"] is not None:
        record["analytic_vs_traced"] = peak_error(record["analytic_bytes"], record["memory"]["total"])
    return record


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:+.3%}"


def to_markdown(rows: list[dict[str, Any]], big: dict[str, Any] | None, meta: dict[str, Any]) -> str:
    lines = [
        "# Traced peak memory vs measured CPU allocator peak",
        "",
        f"Machine: {meta['machine']}; load average at start {meta['load_average']}. Measured = torch profiler "
        "(`profile_memory=True`) peak of two real AdamW iterations; traced = the same step under "
        "FakeTensorMode + MemTracker; analytic = `analytic_memory(..., overhead=OverheadModel.cpu())`. "
        "Errors are (estimate − measured) / measured.",
        "",
        "| preset | precision | micro-batch | seq | measured MiB | traced MiB | traced error | analytic MiB "
        "| analytic error | trace s | FLOPs traced / spec |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        analytic = "—" if r["analytic_bytes"] is None else f"{r['analytic_bytes'] / 2**20:,.2f}"
        lines.append(
            f"| {r['preset']} | {r['precision']} | {r['micro_batch']} | {r['seq_len']} | "
            f"{r['measured_bytes'] / 2**20:,.2f} | {r['traced_bytes'] / 2**20:,.2f} | {_pct(r['traced_error'])} | "
            f"{analytic} | {_pct(r['analytic_error'])} | {r['trace_wall_s']:.1f} | {r['flops_ratio']:.4f} |"
        )
    worst = max(abs(r["traced_error"]) for r in rows)
    lines += ["", f"Worst traced error: {worst:.4%} over {len(rows)} configurations."]
    analytic = [abs(r["analytic_error"]) for r in rows if r["analytic_error"] is not None]
    if analytic:
        lines.append(f"Analytic vs measured: worst {max(analytic):.2%}, mean {sum(analytic) / len(analytic):.2%}.")
    lines.append("FLOPs traced / spec > 1 with SDPA: the flash backward recomputes the scores (5 score-sized "
                 "matmuls instead of 4).")
    if big:
        lines += [
            "",
            f"## {big['model']} shape, micro-batch 1, sequence {big['seq_len']}, {big['precision']}",
            "",
            f"- traced peak: {big['memory']['total'] / GIB:,.2f} GiB (weights {big['memory']['weights'] / GIB:,.2f}, "
            f"optimizer {big['memory']['optimizer'] / GIB:,.2f}, activations {big['memory']['activations'] / GIB:,.2f})",
            f"- trace wall time: {big['trace_wall_s']:.1f} s (process incl. imports "
            f"{big['with_interpreter_and_imports_s']:.1f} s)",
            f"- process peak RSS: {big['max_rss_bytes'] / 2**20:,.0f} MiB (fake tensors hold no data)",
        ]
        if big.get("analytic_bytes") is not None:
            lines.append(f"- analytic (CPU overhead model): {big['analytic_bytes'] / GIB:,.2f} GiB, "
                         f"{_pct(big['analytic_vs_traced'])} vs traced")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    grid = [(p, s, mbs[:2]) for p, s, mbs in GRID[:1]] if quick else GRID
    meta = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "load_average": " ".join(f"{x:.1f}" for x in __import__("os").getloadavg()),
            "python": platform.python_version()}
    rows = []
    for preset, seq_len, micro_batches in grid:
        for precision in PRECISIONS:
            for micro_batch in micro_batches:
                row = accuracy_row(preset, precision, micro_batch, seq_len)
                rows.append(row)
                print(f"{preset} {precision} b={micro_batch}: traced {_pct(row['traced_error'])}, "
                      f"analytic {_pct(row['analytic_error'])}, trace {row['trace_wall_s']:.1f} s", flush=True)
    big = None if quick else big_model_timing()
    if big:
        print(f"{BIG_MODEL} seq {BIG_SEQ}: trace {big['trace_wall_s']:.1f} s, RSS {big['max_rss_bytes'] / 2**20:.0f} MiB")
    meta["self_max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    RESULTS.mkdir(exist_ok=True)
    name = "traced_accuracy_quick" if quick else "traced_accuracy"
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows, "big_model": big}, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(to_markdown(rows, big, meta))
    worst = max(abs(r["traced_error"]) for r in rows)
    return 0 if worst <= 0.02 else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
