"""Published batch-size laws against the batches of published pretraining runs (the registry).

Example::

    .venv/bin/python -m benchmarks.batch_laws      # writes benchmarks/results/batch_laws.{json,md} (seconds)

For every pretraining run of ``src/batchpilot/data/registry`` that publishes its global batch and its
training tokens and has a model preset, each law of :mod:`batchpilot.plan.batch_laws` predicts a batch
from the run's N, D and sequence length; the table gives prediction / published. Runs that ramp their
batch are compared with their final batch (the start is listed). A law is "within 2×" of a run when
0.5 ≤ ratio ≤ 2. Caveats printed with the table: DeepSeek LLM 7B/67B chose their batch with the DeepSeek
law (not an independent test of it); every run lies outside every law's fitted range (all are
extrapolations); the critical-batch laws (Zhang et al., Kaplan et al.) predict where parallelism stops
paying, which a run may exceed on purpose.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from batchpilot.errors import BatchpilotError
from batchpilot.plan.batch_laws import LAWS, law_inputs, predict_all
from batchpilot.plan.registry import entries
from batchpilot.specs.model import load_model

RESULTS = Path(__file__).resolve().parent / "results"
PRESET = {"llama-3-405b": "llama-3.1-405b"}
"""Registry names whose model preset has another name (Llama 3 405B is the 3.1 release's architecture)."""
SELF_FIT = {"deepseek-llm-7b", "deepseek-llm-67b"}
"""Runs whose batch was chosen with one of the laws (DeepSeek LLM §3.1)."""


def rows() -> tuple[list[dict[str, Any]], list[str]]:
    out, skipped = [], []
    for e in entries():
        if e.stage != "pretraining" or not e.published or not e.global_batch_tokens or not e.total_training_tokens:
            continue
        try:
            model = load_model(PRESET.get(e.name, e.name))
        except BatchpilotError:
            skipped.append(f"{e.name} (no model preset)")
            continue
        seq = e.seq_len or 2048
        x = law_inputs(model, train_tokens=e.total_training_tokens, seq_len=seq)
        start = e.schedule.start_tokens if e.schedule and e.schedule.start_tokens else None
        preds = {p.law: {"batch_tokens": p.batch_tokens, "ratio": p.batch_tokens / e.global_batch_tokens,
                         "learning_rate": p.learning_rate, "in_range": p.in_range} for p in predict_all(x)}
        out.append({"run": e.name, "non_embedding_params": x.non_embedding_params, "train_tokens": x.train_tokens,
                    "seq_len": seq, "published_tokens": e.global_batch_tokens, "start_tokens": start,
                    "schedule": e.schedule.kind if e.schedule else "constant", "self_fit": e.name in SELF_FIT,
                    "moe": model.is_moe, "predictions": preds})
    return out, skipped


def summary(table: list[dict[str, Any]]) -> dict[str, Any]:
    """Per law: runs within 1.5× and 2×, median factor off, geometric-mean bias (independent runs only)."""
    out = {}
    for law in LAWS:
        ratios = [r["predictions"][law]["ratio"] for r in table if not (r["self_fit"] and law == "deepseek-llm-2024")]
        logs = [math.log(x) for x in ratios]
        out[law] = {"runs": len(ratios), "within_1_5x": sum(1 / 1.5 <= x <= 1.5 for x in ratios),
                    "within_2x": sum(0.5 <= x <= 2 for x in ratios),
                    "median_factor": math.exp(statistics.median(abs(v) for v in logs)),
                    "geomean_ratio": math.exp(statistics.fmean(logs))}
    return out


def markdown(table: list[dict[str, Any]], summ: dict[str, Any], skipped: list[str]) -> str:
    laws = list(LAWS)
    head = "| run | N (non-emb.) | D | published batch (tokens) | " + " | ".join(laws) + " |"
    lines = ["Prediction / published global batch (tokens). ✓ = within 2×. Batches of ramped runs: the final one "
             "(start in brackets).", "", head, "|" + "---|" * (4 + len(laws))]
    for r in table:
        pub = f"{r['published_tokens'] / 1e6:.2f}M" + (f" (from {r['start_tokens'] / 1e6:.2f}M)" if r["start_tokens"] else "")
        cells = []
        for law in laws:
            p = r["predictions"][law]
            mark = " ✓" if 0.5 <= p["ratio"] <= 2 else ""
            self_fit = " (self)" if r["self_fit"] and law == "deepseek-llm-2024" else ""
            cells.append(f"{p['batch_tokens'] / 1e6:.2f}M = {p['ratio']:.2f}×{mark}{self_fit}")
        name = r["run"] + (" (MoE)" if r["moe"] else "")
        lines.append(f"| {name} | {r['non_embedding_params']:.3g} | {r['train_tokens']:.3g} | {pub} | " + " | ".join(cells) + " |")
    lines += ["", "| law | runs | within 1.5× | within 2× | median factor off | geometric-mean ratio |",
              "|---|---|---|---|---|---|"]
    for law, s in summ.items():
        lines.append(f"| {law} | {s['runs']} | {s['within_1_5x']} | {s['within_2x']} | {s['median_factor']:.2f}× | "
                     f"{s['geomean_ratio']:.2f} |")
    lines += ["", "Laws: " + "; ".join(f"**{k}** — {v.formula} ({v.quantity}; fitted {v.fitted_range}; {v.citation})"
                                     for k, v in LAWS.items()),
              "", "Every run is outside every law's fitted range, so each number is an extrapolation. DeepSeek LLM "
              "7B/67B (\"self\") chose their batches with the DeepSeek law and are left out of its summary. "
              "Skipped: " + (", ".join(skipped) or "none") + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    table, skipped = rows()
    summ = summary(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "batch_laws.json").write_text(json.dumps({"rows": table, "summary": summ, "skipped": skipped},
                                                        indent=1) + "\n", encoding="utf-8")
    text = markdown(table, summ, skipped)
    (RESULTS / "batch_laws.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
