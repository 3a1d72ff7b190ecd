"""``batchpilot noise`` — measure the gradient noise scale B_simple ≈ B_crit on your model and data.

Examples::

    batchpilot noise --steps 20
    batchpilot noise --model tiny-llama-15m --seq-len 256 --micro-batch 4 --global-batch 32 --steps 40 --json > noise.json
    batchpilot noise --model ./my-checkpoint --data corpus.jsonl --train-tokens 2T
    batchpilot noise --model runs/base --json      # at a `batchpilot train --out runs/base` run's newest checkpoint

``noise.json`` feeds the planner (``batchpilot plan --noise noise.json``).
"""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from batchpilot.cli._common import console, handle_errors, print_json
from batchpilot.tune.noise_run import NoiseRunSettings, measure_noise
from batchpilot.units import format_count, parse_count


@handle_errors
def noise(
    model: str = typer.Option("tiny-llama-1m", "--model", help="Preset, config.json, local pretrained directory, or a `batchpilot train` run folder (its newest good checkpoint's weights)."),
    data: str = typer.Option("stdlib", "--data", help="stdlib, a text/JSONL/Parquet file or folder, or hf:NAME."),
    tokenizer: str = typer.Option("bytes", "--tokenizer", help="bytes, bpe:VOCAB or a local tokenizer directory."),
    seq_len: int = typer.Option(256, "--seq-len", min=2, help="Tokens per sequence."),
    micro_batch: int = typer.Option(4, "--micro-batch", min=1, help="Sequences per micro-batch (B_small)."),
    global_batch: int = typer.Option(16, "--global-batch", min=2, help="Sequences per step (B_big), ≥ 2 × micro."),
    steps: int = typer.Option(20, "--steps", min=2, help="K: optimizer steps measured."),
    seed: int = typer.Option(0, "--seed", help="Model init and data order."),
    lr: float = typer.Option(1e-3, "--lr", min=0.0, help="Learning rate of the K steps."),
    train_tokens: str = typer.Option("", "--train-tokens", help="Planned training tokens (e.g. 2T) for the DeepSeek prior."),
    out: str = typer.Option("", "--out", help="Keep the run's metrics.jsonl in this folder."),
    threads: int = typer.Option(0, "--threads", min=0, help="CPU threads (0: all cores)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Measure B_simple (McCandlish et al. 2018) over K steps; print it with its band, the trade-off and priors."""
    settings = NoiseRunSettings(
        model=model, data=data, tokenizer=tokenizer, seq_len=seq_len, micro_batch_sequences=micro_batch,
        global_batch_sequences=global_batch, steps=steps, seed=seed, lr=lr,
        train_tokens=float(parse_count(train_tokens, "--train-tokens")) if train_tokens else None,
        out=out or None, threads=threads or None)
    record = measure_noise(settings)
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
