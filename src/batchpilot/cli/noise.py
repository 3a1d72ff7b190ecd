"""``batchpilot noise`` — measure the gradient noise scale B_simple ≈ B_crit on your model and data.

Examples::

    batchpilot noise --steps 20
    batchpilot noise --model tiny-llama-15m --seq-len 256 --micro-batch 4 --global-batch 32 --steps 40 --json > noise.json
    batchpilot noise --model ./my-checkpoint --data corpus.jsonl --train-tokens 2T
    batchpilot noise --model runs/base --json      # at a `batchpilot train --out runs/base` run's newest checkpoint

``noise.json`` feeds the planner (``batchpilot plan --noise noise.json``).
"""

from __future__ import annotations

from typing import Annotated, Any

from rich.table import Table

from batchpilot.cli._common import console, handle_errors, print_json
from batchpilot.cli._options import (
    DEMO_MODEL,
    DEMO_SEQ_LEN,
    DataOpt,
    JsonOpt,
    SeedOpt,
    SeqLenOpt,
    ThreadsOpt,
    TokenizerOpt,
    TrainModelOpt,
    TrainTokensOpt,
    count,
    number,
    option,
    whole,
)
from batchpilot.tune.noise_run import NoiseRunSettings, measure_noise
from batchpilot.units import format_count


@handle_errors
def noise(
    model: TrainModelOpt = DEMO_MODEL,
    data: DataOpt = "stdlib",
    tokenizer: TokenizerOpt = "bytes",
    seq_len: SeqLenOpt = DEMO_SEQ_LEN,
    micro_batch: Annotated[int, option("--micro-batch", count("--micro-batch"), help=(
        "Sequences per micro-batch: B_small."))] = 4,
    global_batch: Annotated[int, option("--global-batch", count("--global-batch"), help=(
        "Sequences per optimizer step: B_big, at least 2 × --micro-batch."))] = 16,
    steps: Annotated[int, option("--steps", whole("--steps"), help="K: optimizer steps measured (≥ 2).")] = 20,
    seed: SeedOpt = 0,
    lr: Annotated[float, option("--lr", number("--lr"), help="Learning rate of the K steps.")] = 1e-3,
    train_tokens: TrainTokensOpt = None,
    out: Annotated[str | None, option("--out", show_default="a temporary folder", help=(
        "Keep the run's metrics.jsonl in this folder."))] = None,
    threads: ThreadsOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Measure B_simple (McCandlish et al. 2018) over K steps; print it with its band, the trade-off and priors."""
    settings = NoiseRunSettings(
        model=model, data=data, tokenizer=tokenizer, seq_len=seq_len, micro_batch_sequences=micro_batch,
        global_batch_sequences=global_batch, steps=steps, seed=seed, lr=lr,
        train_tokens=float(train_tokens) if train_tokens else None, out=out, threads=threads)
    record = measure_noise(settings).to_dict()
    if json_output:
        print_json(record)
        return
    _render(record)


def _fmt(value: Any) -> str:
    return "∞" if value is None or value == float("inf") else f"{value:,.1f}"


def _render(r: dict[str, Any]) -> None:
    lo, hi = r["band"]["sequences"]
    tlo, thi = r["band"]["tokens"]
    console.print(f"B_simple ≈ B_crit: [bold]{_fmt(r['b_simple_sequences'])}[/] sequences "
                  f"(95% band {_fmt(lo)}–{_fmt(hi)}), {_fmt(r['b_simple_tokens'])} tokens ({_fmt(tlo)}–{_fmt(thi)}); "
                  f"{r['steps_measured']} steps, loss {r['loss_first']:.3f} → {r['loss_last']:.3f}, "
                  f"{'confident' if r['confident'] else 'NOT confident (band too wide: measure more steps)'}")
    table = Table("batch (seq)", "batch (tokens)", "steps / S_min", "examples / E_min",
                  title="S = S_min(1 + B_crit/B), E = E_min(1 + B/B_crit)")
    for row in r["tradeoff"]:
        table.add_row(str(row["batch_sequences"]), format_count(row["batch_tokens"]), f"{row['steps_vs_min']:.2f}",
                      f"{row['examples_vs_min']:.2f}")
    console.print(table)
    priors = r["priors"]
    if "kaplan_b_crit_tokens" in priors:
        console.print(f"Kaplan prior B_crit(L): {format_count(priors['kaplan_b_crit_tokens'])} tokens — {priors['kaplan_note']}")
    if "deepseek_b_opt_tokens" in priors:
        console.print(f"DeepSeek prior B_opt(C): {format_count(priors['deepseek_b_opt_tokens'])} tokens — {priors['deepseek_note']}")
    _render_laws(priors.get("laws") or [], r["seq_len"])
    _render_schedule(r)


def _render_laws(laws: list[dict[str, Any]], seq_len: int) -> None:
    """The published batch laws side by side (plan.batch_laws), and how far apart they are."""
    if not laws:
        return
    table = Table("law", "batch (tokens)", "batch (seq)", "LR", "fitted range", title="Published batch laws (--train-tokens)")
    for law in laws:
        lr = f"{law['learning_rate']:.2e}" if law["learning_rate"] else "—"
        table.add_row(law["law"], format_count(law["batch_tokens"]), f"{law['batch_tokens'] / seq_len:,.1f}", lr,
                      "inside" if law["in_range"] else law["note"])
    console.print(table)
    values = sorted((law["batch_tokens"], law["law"]) for law in laws)
    console.print(f"the laws disagree by {values[-1][0] / values[0][0]:.1f}× ({values[0][1]} smallest, "
                  f"{values[-1][1]} largest); benchmarks/results/batch_laws.md checks them on published runs")


def _render_schedule(r: dict[str, Any]) -> None:
    advice = r.get("schedule")
    if advice is None:
        if r.get("schedule_error"):
            console.print(f"no whole-run schedule: {r['schedule_error']}", markup=False)
        return
    console.print(f"whole-run schedule ({advice['source']}): --batch-schedule {advice['schedule']} "
                  f"--lr {advice['lr_first']:.3g} --lr-scaling sqrt — {advice['lr_anchor']}", markup=False)
    costs = ", ".join(f"{c['name']} {c['steps']:,.0f} steps / {format_count(c['tokens'])} tokens" for c in advice["costs"])
    console.print(f"to the predicted loss {advice['target_loss']:.3f}: {costs} ({advice['extrapolation']})", markup=False)
