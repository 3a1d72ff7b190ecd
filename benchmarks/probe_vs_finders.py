"""Largest micro-batch under a real memory limit: batchpilot's probe vs Lightning and Accelerate.

Run::

    .venv/bin/python -m benchmarks.probe_vs_finders            # quick set (a few minutes on 2 cores)
    .venv/bin/python -m benchmarks.probe_vs_finders --full     # 1/2/3 GiB at seq 512, fp32 and bf16
    .venv/bin/python -m benchmarks.probe_vs_finders --full --budgets 1GiB --precisions bf16 --output-stem S

Setup: a Llama-shaped ``transformers`` model (``--full``: ``benchmarks/models/bench-llama-3m.json``, 3.15M
parameters, eager attention, sequence 512, budgets 1, 2 and 3 GiB), AdamW, fp32 or CPU bf16 autocast, random
tokens. The setup of the comparison that found, on a 2-core x86_64 machine with torch 2.13 CPU (fp32; the
first measurements, before this benchmark existed): Lightning's ``scale_batch_size`` power mode 5/6/7 trials in
20/31/59 s, binsearch 9/11/13 trials in 30/75/130 s, Accelerate's ``find_executable_batch_size`` (start 128)
17/11/7 trials in 31/41/48 s at 1/2/3 GiB, none returning the true maximum. Each finder runs whole in one fresh child process
(:mod:`benchmarks._finders_child`) with ``MALLOC_MMAP_THRESHOLD_=131072``: Lightning's
``Tuner.scale_batch_size`` (``power`` and ``binsearch``, defaults: init 2, 3 steps per trial) and
Accelerate's ``find_executable_batch_size`` (start 128, two full steps per call) run under
``RLIMIT_AS`` = the process's own size after imports, model (and optimizer object) + budget.
batchpilot's probe (search only, no knee ladder) puts the same limit on each of its trial processes.

The true maximum L is found separately in fresh processes (L fits for 2 full steps, L + 1 does not),
and every finder's answer is re-run in a fresh process under the same limit: does it truly fit, and
its tokens/s (fastest of 2 timed steps). Wall time is the finder call itself (imports and model
building excluded for all). The machine is shared: compare ratios within one run.

Writes ``benchmarks/results/probe_vs_finders.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from batchpilot.measure.cpu_runner import CpuTrialRunner
from batchpilot.measure.probe_types import ProbeRequest
from batchpilot.measure.search import search_max_micro_batch
from batchpilot.records.probe import ProbeTrial
from batchpilot.specs.model import load_model
from batchpilot.specs.settings import RunSettings
from batchpilot.units import parse_bytes

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
FINDERS = ("batchpilot", "lightning-power", "lightning-binsearch", "accelerate")

QUICK: dict[str, Any] = {"model": "tiny-llama-1m", "seq_len": 128, "budgets": ["256MiB"], "attention": "eager",
                         "precisions": ["fp32"]}
FULL: dict[str, Any] = {"model": str(HERE / "models" / "bench-llama-3m.json"), "seq_len": 512,
                        "budgets": ["1GiB", "2GiB", "3GiB"], "attention": "eager", "precisions": ["fp32", "bf16"]}


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="3.15M Llama, seq 512, 1/2/3 GiB, fp32 and bf16")
    p.add_argument("--model", help="preset or config.json (default: tiny-llama-1m; --full: bench-llama-3m)")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--budgets", help="comma-separated, e.g. 256MiB,512MiB")
    p.add_argument("--precisions", help="comma-separated: fp32, bf16 (CPU autocast)")
    p.add_argument("--finders", default=",".join(FINDERS))
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per finder process")
    p.add_argument("--output-stem", default="probe_vs_finders", help="results/<stem>.json and .md")
    p.add_argument("--render", metavar="JSON", help="only re-write the .md next to an existing results JSON")
    return p.parse_args(argv)


def run_finder(finder: str, setup: dict[str, Any], budget_bytes: int, timeout_s: float) -> dict[str, Any]:
    """One finder in a fresh process; its JSON line, plus the process's own wall time."""
    model = load_model(setup["model"])
    spec = {"finder": finder, "model": setup["model"], "hf_config": dict(model.hf_config),
            "seq_len": setup["seq_len"], "budget_bytes": budget_bytes, "attention": setup["attention"],
            "attn": "eager" if setup["attention"] == "eager" else "sdpa", "precision": setup["precision"]}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks._finders_child", json.dumps(spec)], cwd=HERE.parent,
                          env=env, capture_output=True, text=True, timeout=timeout_s)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"finder": finder, "found": None, "tried": [], "seconds": None,
                "error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}",
                "process_seconds": time.perf_counter() - start}
    out: dict[str, Any] = json.loads(lines[-1])
    out["process_seconds"] = time.perf_counter() - start
    return out


class FreshTrials:
    """Fresh-process trials of the same model/budget (the probe's CPU runner), cached by size."""

    def __init__(self, setup: dict[str, Any], budget_bytes: int) -> None:
        self.request = ProbeRequest(model=load_model(setup["model"]),
                                    settings=RunSettings(precision=setup["precision"], attention=setup["attention"]),
                                    seq_len=setup["seq_len"], device="cpu", budget_bytes=budget_bytes,
                                    timed_steps=2)
        self.runner = CpuTrialRunner(self.request)
        self.cache: dict[int, ProbeTrial] = {}

    def __call__(self, micro_batch: int) -> ProbeTrial:
        if micro_batch not in self.cache:
            self.cache[micro_batch] = self.runner(micro_batch)
        return self.cache[micro_batch]

    def true_max(self, seed: int) -> int:
        """L by a plain boolean search (no peaks) seeded at ``seed``: ends with L fitting and L + 1 not."""
        return search_max_micro_batch(max(1, seed), lambda b: self(b).fits).max_micro_batch


def one_budget(setup: dict[str, Any], budget_text: str, finders: list[str], timeout_s: float) -> dict[str, Any]:
    """Every finder at one budget and precision (``setup["precision"]``), then the true maximum."""
    budget = parse_bytes(budget_text, "budget")
    print(f"-- budget {budget_text}, {setup['precision']}", flush=True)
    rows = []
    for finder in finders:
        row = run_finder(finder, setup, budget, timeout_s)
        print(f"   {finder}: found {row.get('found')} after {len(row.get('tried', []))} trials "
              f"in {row.get('seconds') or 0:.1f} s {row.get('error', '')}", flush=True)
        rows.append(row)
    fresh = FreshTrials(setup, budget)
    found = [r["found"] for r in rows if r.get("found")]
    true_max = fresh.true_max(max(found) if found else 1)
    for row in rows:
        size = row.get("found")
        check = fresh(size) if size else None
        row["num_trials"] = len(row.get("tried", []))
        row["truly_fits"] = bool(check and check.fits)
        row["tokens_per_s"] = check.tokens_per_s if check else None
    print(f"   true max L = {true_max}", flush=True)
    return {"budget": budget_text, "budget_bytes": budget, "precision": setup["precision"], "true_max": true_max,
            "finders": rows,
            "fresh_trials": [dataclasses.asdict(t) for t in fresh.cache.values()]}


def _load(record: dict[str, Any]) -> str:
    load = record.get("load_average")
    return " ".join(f"{x:.1f}" for x in load) if load else "not recorded"


def _ratio(rows: dict[str, dict[str, Any]], key: str) -> float | None:
    bp, ls = rows.get("batchpilot", {}).get(key), rows.get("lightning-binsearch", {}).get(key)
    return bp / ls if bp and ls else None


def markdown(record: dict[str, Any]) -> str:
    setup = record["setup"]
    lines = [
        "# Max micro-batch finders under a real memory limit",
        "",
        f"Model `{Path(setup['model']).stem}` ({record['params']:,} parameters), AdamW, sequence "
        f"{setup['seq_len']}, {setup['attention']} attention, random tokens; each finder whole in a fresh "
        "process under RLIMIT_AS = own baseline + budget, `MALLOC_MMAP_THRESHOLD_=131072` "
        f"(batchpilot: per trial process). Run {record['date']} on {record['cpus']} shared CPU cores, x86_64, "
        f"torch 2.13 CPU (load average at start {_load(record)}) "
        f"(`python -m benchmarks.probe_vs_finders {record.get('argv', '')}`).",
        "",
        "| precision | budget (true L) | finder | trials | wall s | size found | truly fits | tokens/s at that size |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b in record["budgets"]:
        for r in b["finders"]:
            tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "—"
            secs = f"{r['seconds']:.1f}" if r.get("seconds") else "—"
            n = r.get("num_trials", r.get("trials"))
            lines.append(f"| {b.get('precision', 'fp32')} | {b['budget']} ({b['true_max']}) | {r['finder']} | {n} | "
                         f"{secs} | {r.get('found') or '—'} | {'yes' if r['truly_fits'] else 'no'} | {tps} |")
    lines += ["", "batchpilot vs Lightning binsearch (goal: ≤ 1/3 of the trials and of the wall time, size ≥):", ""]
    for b in record["budgets"]:
        rows = {r["finder"]: r for r in b["finders"]}
        t, w = _ratio(rows, "num_trials"), _ratio(rows, "seconds")
        bp, ls = rows.get("batchpilot", {}).get("found"), rows.get("lightning-binsearch", {}).get("found")
        wait = rows.get("batchpilot", {}).get("server_wait_s")
        waited = f"; the first trial waited {wait:.1f} s for the fork server" if wait is not None else ""
        label = f"{b.get('precision', 'fp32')} {b['budget']}"
        lines.append(f"- {label}: trials × {t:.2f}, wall time × {w:.2f}, size {bp} vs {ls} (true {b['true_max']})"
                     f"{waited}" if t and w else f"- {label}: incomplete (see JSON)")
    lines += [
        "",
        "Notes: trials = sizes the finder ran (Lightning: 3 steps each; Accelerate: 2; batchpilot: 2, the "
        "second timed, with the optimizer state created before the first so a size that does not fit "
        "fails in step 1; every batchpilot trial runs the step `batchpilot train` runs: fused AdamW, the fp32 "
        "token-sum loss, clipping). Wall time = the finder call only (imports and model building excluded "
        "for all; batchpilot's trial server — one interpreter that imports torch and transformers, which its "
        "trial processes fork from — is started when the finder's process starts, before that process's own "
        "imports, and any wait for it left at the first trial is in the probe's time; each trial process's "
        "start is in it too). batchpilot's throughput-knee ladder is not "
        "run here (`knee=False`): it is extra trials below the maximum, reported by `batchpilot probe`. "
        "\"truly fits\" and tokens/s come from a fresh process at that size under the same limit "
        "(fastest of 2 timed steps). The cores are shared with other jobs: compare within a run. Where "
        "batchpilot's time goes (process start, model build, optimizer state, each step): set "
        "`BATCHPILOT_PROBE_TRACE=FILE` (one JSON line per phase of the probe and of each trial process).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    args = _args(argv)
    if args.render:
        path = Path(args.render)
        path.with_suffix(".md").write_text(markdown(json.loads(path.read_text(encoding="utf-8"))), encoding="utf-8")
        return 0
    setup = dict(FULL if args.full else QUICK)
    if args.model:
        setup["model"] = args.model
    if args.seq_len:
        setup["seq_len"] = args.seq_len
    if args.budgets:
        setup["budgets"] = args.budgets.split(",")
    if args.precisions:
        setup["precisions"] = args.precisions.split(",")
    finders = [f for f in args.finders.split(",") if f]
    record = {"setup": setup, "full": args.full, "argv": " ".join(argv),
              "params": load_model(setup["model"]).params_total,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
              "load_average": os.getloadavg(),
              "budgets": [one_budget({**setup, "precision": p}, b, finders, args.timeout)
                          for p in setup["precisions"] for b in setup["budgets"]]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.output_stem}.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    (RESULTS / f"{args.output_stem}.md").write_text(markdown(record), encoding="utf-8")
    print(markdown(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
