"""Backtest of the loss-curve extrapolation on the committed CPU-task runs (no training; seconds).

Example::

    .venv/bin/python -m benchmarks.loss_backtest     # writes benchmarks/results/loss_backtest.md

Every run with a held-out loss trajectory in ``results/noise_adaptive.json`` (the race's fixed 8/32/64/128,
ramp and adaptive runs; the ``schedule`` part's fixed-16, schedule and fixed-32 runs) and the base run of
``results/critical_batch.json`` (fixed 16 at 3e-3) is cut to its first 15% and 30% of tokens (evaluations
from step 10 on, as ``noise_adaptive``'s short run); the loss curve is fitted on that window by the rule of
:func:`batchpilot.plan.schedule_advice.measured_loss_curve` and its prediction compared with the held-out
loss at the run's last evaluation. One more row is the case the ``schedule`` part validated: fixed-16's first
15% of the 1M-token whole run, predicted at 1M tokens. The old rule (an irreducible floor searched on a grid
below the smallest loss, kept by least squares, as :mod:`batchpilot.estimate.loss_curve` did before) is fitted
to the same points for comparison. Δα = ln(L_pred/L_true)/ln(D_true/D_fit) is the exponent the run realised
beyond the fitted one; its range over these rows is ``EXPONENT_SHORTFALL``, the band of the fit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from batchpilot.estimate.loss_curve import EXPONENT_SHORTFALL
from batchpilot.plan.schedule_advice import LOSS_FIT_FROM, measured_loss_curve

RESULTS = Path(__file__).resolve().parent / "results"
FRACTIONS = (0.15, 0.30)
FIRST_STEP = 10
"""Evaluations before this step are left out (noise_adaptive's short run: the B_simple EMA needs ~10 steps)."""
FAILURE = ("schedule/fixed-16", 1_000_000)
"""The schedule part's validated case: fixed-16, whole run 1M tokens."""


def load_runs() -> dict[str, list[dict[str, float]]]:
    """Held-out evaluations (step, tokens, val_loss) of every committed run, by name."""
    data = json.loads((RESULTS / "noise_adaptive.json").read_text())
    named = {k: v for k, v in data.items() if not k.startswith("_")}
    named |= {f"schedule/{k}": v for k, v in data["_schedule"].items() if not k.startswith("_") and k != "advice"}
    runs = {k: [{"step": r["step"], "tokens": r["tokens"], "val_loss": r["val_loss"]} for r in v["trajectory"]
                if r.get("val_loss") is not None] for k, v in named.items()}
    curve = json.loads((RESULTS / "critical_batch.json").read_text())["base_run"]["curve"]
    runs["critical_batch/base"] = [{k: r[k] for k in ("step", "tokens", "val_loss")} for r in curve
                                   if r.get("val_loss") is not None and r["tokens"] > 0]
    return runs


def floor_grid_fit(tokens: list[float], losses: list[float], grid: int = 200) -> tuple[float, float, float]:
    """The old rule: L = L_∞ + A·D^(−α) with L_∞ on a grid in [0, min L), least squares in L; (L_∞, A, α)."""
    best: tuple[float, float, float, float] | None = None
    xs = [math.log(d) for d in tokens]
    for i in range(grid):
        l_inf = min(losses) * i / grid
        ys = [math.log(v - l_inf) for v in losses]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
        if slope >= 0:
            continue
        a = math.exp(my - slope * mx)
        sse = sum((l_inf + a * d**slope - v) ** 2 for d, v in zip(tokens, losses, strict=True))
        if best is None or sse < best[0]:
            best = (sse, l_inf, a, -slope)
    if best is None:
        raise ValueError("the loss does not fall over the window")
    return best[1], best[2], best[3]


def backtest_row(name: str, evals: list[dict[str, float]], fraction: float, whole: float,
                 truth: float) -> dict[str, Any]:
    """Fit on evaluations up to ``fraction``·``whole`` tokens; predict at ``whole``."""
    window = [r for r in evals if r["step"] >= FIRST_STEP and r["tokens"] <= fraction * whole]
    tokens, losses = [r["tokens"] for r in window], [r["val_loss"] for r in window]
    fit = measured_loss_curve(tokens, losses)
    kept = [(d, v) for d, v in zip(tokens, losses, strict=True) if d >= LOSS_FIT_FROM * max(tokens)]
    l_inf, a, alpha = floor_grid_fit([d for d, _ in kept], [v for _, v in kept])
    new, old = fit.loss(whole), l_inf + a * whole ** (-alpha)
    lo, hi = fit.band(whole)
    return {"run": name, "fraction": fraction, "points": len(kept), "fit_tokens": fit.tokens_range[1],
            "whole_tokens": whole, "truth": truth, "old": old, "old_l_inf": l_inf, "new": new, "band": (lo, hi),
            "alpha": fit.alpha, "d_alpha": math.log(new / truth) / math.log(whole / fit.tokens_range[1]),
            "inside": lo <= truth <= hi}


def backtest() -> list[dict[str, Any]]:
    """Every run at each of FRACTIONS, then the schedule part's failure case."""
    runs = load_runs()
    rows = [backtest_row(name, evals, f, evals[-1]["tokens"], evals[-1]["val_loss"])
            for f in FRACTIONS for name, evals in runs.items()]
    name, whole = FAILURE
    at_whole = json.loads((RESULTS / "noise_adaptive.json").read_text())["_schedule"]["fixed-16"]
    rows.append(backtest_row(f"{name} → {whole:,}", runs[name], FRACTIONS[0], whole,
                             at_whole["val_loss_at_train_tokens"]))
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| run | window | points | fitted to (tokens) | predicted at | held-out loss | old fit (L_∞) | old error | "
             "new fit | new error | Δα | band | inside |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['fraction']:.0%} | {r['points']} | {r['fit_tokens']:,.0f} | "
                     f"{r['whole_tokens']:,.0f} | {r['truth']:.3f} | {r['old']:.3f} ({r['old_l_inf']:.2f}) | "
                     f"{r['old'] - r['truth']:+.3f} | {r['new']:.3f} | {r['new'] - r['truth']:+.3f} | "
                     f"{r['d_alpha']:+.3f} | {r['band'][0]:.3f}–{r['band'][1]:.3f} | {'yes' if r['inside'] else 'no'} |")
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]]) -> str:
    out = []
    for f in FRACTIONS:
        sel = [r for r in rows if r["fraction"] == f]
        old = [abs(r["old"] - r["truth"]) for r in sel]
        new = [abs(r["new"] - r["truth"]) for r in sel]
        out.append(f"First {f:.0%} ({len(sel)} predictions): |error| old mean {sum(old) / len(old):.3f}, max "
                   f"{max(old):.3f}; new mean {sum(new) / len(new):.3f}, max {max(new):.3f} nats; "
                   f"{sum(r['inside'] for r in sel)} of {len(sel)} inside the band.")
    d = [r["d_alpha"] for r in rows]
    out.append(f"Δα over all rows: {min(d):+.3f} … {max(d):+.3f} (EXPONENT_SHORTFALL = {EXPONENT_SHORTFALL}); "
               f"the old rule's floor L_∞ was ≥ 2.9 nats in {sum(r['old_l_inf'] >= 2.9 for r in rows)} of "
               f"{len(rows)} fits.")
    return " ".join(out)


def main() -> int:
    rows = backtest()
    text = ("# Loss-curve backtest (CPU task, committed runs)\n\n" + (__doc__ or "").split("loss_backtest.md\n\n")[1].strip()
            + "\n\n" + table(rows) + "\n\n" + summary(rows) + "\n")
    (RESULTS / "loss_backtest.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
