"""Time to plan the full search space: a 671B MoE on 2048 GPUs and a 70B dense model on 512.

Example (CPU, about half a minute)::

    .venv/bin/python -m benchmarks.plan_speed

Cases:

- ``deepseek-v3`` on 2048 H800 (the DeepSeek-V3 cluster, §3.1), sequence 4096, its published final batch
  (15,360 sequences, §4.2; ``--like deepseek-v3``), engine ``megatron`` (ZeRO 0/1, as DeepSeek trained).
- ``llama-3-70b`` on 512 H100-SXM, sequence 8192, 4Mi tokens (512 sequences), engine ``deepspeed``
  (ZeRO 0–3, the largest ZeRO search).

Each case is planned ``REPEATS`` times in two modes: the default search (layouts ordered by an
optimistic throughput bound, dominated layouts skipped) and the exhaustive one (memory evaluated for
every layout); both must return the same ranking, which is checked. Wall time is ``time.perf_counter``
around :func:`batchpilot.plan.planner.plan`, median and minimum of the repeats (shared, noisy machine:
the minimum is the least disturbed run); CPU time (``time.process_time``, this process) beside it, which
other jobs on the machine disturb less. The first repeat runs with the module-level caches of the memory
model cold (a fresh ``batchpilot plan`` process); later repeats find them warm (the web page re-planning).
Results: ``benchmarks/results/plan_speed.json`` and ``.md``.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from batchpilot.plan.planner import PlanRequest, plan
from batchpilot.plan.registry import target_global_batch
from batchpilot.specs.hardware import ClusterSpec, load_accelerator
from batchpilot.specs.model import load_model
from batchpilot.specs.settings import RunSettings

RESULTS = Path(__file__).resolve().parent / "results"
REPEATS = 5
INTER_NODE_BANDWIDTH = 50e9  # one 400 Gb/s NIC per GPU, one direction


def _cases() -> dict[str, PlanRequest]:
    def cluster(gpu: str, gpus: int) -> ClusterSpec:
        return ClusterSpec(accelerator=load_accelerator(gpu), devices_per_node=8, num_nodes=gpus // 8,
                           inter_node_bandwidth_bytes_per_s=INTER_NODE_BANDWIDTH)

    deepseek_batch, _, _ = target_global_batch("deepseek-v3", 4096)
    return {
        "deepseek-v3 / 2048 × h800": PlanRequest(
            model=load_model("deepseek-v3"), cluster=cluster("h800", 2048), seq_len=4096,
            global_batch_sequences=deepseek_batch, settings=RunSettings(engine="megatron")),
        "llama-3-70b / 512 × h100-sxm": PlanRequest(
            model=load_model("llama-3-70b"), cluster=cluster("h100-sxm", 512), seq_len=8192,
            global_batch_tokens=4 * 2**20, settings=RunSettings(engine="deepspeed")),
    }


def _time(request: PlanRequest) -> tuple[list[float], list[float], Any]:
    """Wall and CPU seconds of each repeat, and the last result."""
    times, cpu, result = [], [], None
    for _ in range(REPEATS):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = plan(request)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return times, cpu, result


def _stats(times: list[float], cpu: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "cpu_median_s": statistics.median(cpu),
            "cpu_min_s": min(cpu), "cpu_first_s": cpu[0]}


def _winner(result: Any) -> dict[str, Any]:
    best = result.plans[0].to_dict()
    keys = ("micro_batch", "grad_accum", "dp", "tp", "pp", "ep", "zero_stage", "recompute", "tokens_per_s", "mfu",
            "step_time_s")
    return {k: best[k] for k in keys} | {"memory_total_bytes": best["memory"]["total"]}


def run_case(name: str, request: PlanRequest) -> dict[str, Any]:
    fast_times, fast_cpu, fast = _time(request)
    full_times, full_cpu, full = _time(dataclasses.replace(request, exhaustive=True))
    same = [p.to_dict() for p in fast.plans] == [p.to_dict() for p in full.plans]
    return {
        "case": name, "gpus": request.cluster.total_devices, "seq_len": request.seq_len,
        "engine": request.settings.engine, "global_batch_sequences": fast.plans[0].triad.global_batch_sequences,
        "layouts": fast.layouts, "repeats": REPEATS,
        "default": _stats(fast_times, fast_cpu) | {"memory_evaluations": fast.memory_evaluations,
                                                   "pruned": fast.pruned},
        "exhaustive": _stats(full_times, full_cpu) | {"memory_evaluations": full.memory_evaluations,
                                                      "feasible": full.feasible,
                       "rejected": len(full.rejected)},
        "same_ranking": same, "winner": _winner(fast), "rationale": fast.rationale,
    }


def _markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["# Planning time (full search space)", "",
             "| case | layouts | default search | CPU | memory evals | exhaustive | CPU | memory evals | same ranking "
             "| winner |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        w = r["winner"]
        winner = (f"micro {w['micro_batch']} × accum {w['grad_accum']} × dp {w['dp']}, tp {w['tp']}, pp {w['pp']}, "
                  f"ep {w['ep']}, ZeRO-{w['zero_stage']}, {w['recompute']}; MFU {w['mfu']:.1%}")
        d, x = r["default"], r["exhaustive"]
        lines.append(f"| {r['case']} | {r['layouts']} | {d['median_s']:.2f} s (min {d['min_s']:.2f}) "
                     f"| {d['cpu_median_s']:.2f} s (min {d['cpu_min_s']:.2f}, first {d['cpu_first_s']:.2f}) "
                     f"| {d['memory_evaluations']} | {x['median_s']:.2f} s (min {x['min_s']:.2f}) "
                     f"| {x['cpu_median_s']:.2f} s (min {x['cpu_min_s']:.2f}) | {x['memory_evaluations']} "
                     f"| {r['same_ranking']} | {winner} |")
    lines += ["", f"Median of {REPEATS} runs on a shared 2-core machine (wall time, and this process's CPU time; the "
              f"first run's memory caches cold); CPython {platform.python_version()}.", ""]
    return "\n".join(lines)


def main() -> int:
    rows = [run_case(name, request) for name, request in _cases().items()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "plan_speed", "python": platform.python_version(), "machine": platform.machine(),
              "cases": rows}
    (RESULTS / "plan_speed.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    (RESULTS / "plan_speed.md").write_text(_markdown(rows), encoding="utf-8")
    print(_markdown(rows))
    return 0 if all(r["same_ranking"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
