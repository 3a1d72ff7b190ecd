"""Measure the gradient noise scale B_simple on a real model and data over K training steps.

Examples::

    batchpilot noise --steps 20                                    # tiny-llama-1m on the stdlib, CPU
    batchpilot noise --model tiny-llama-15m --seq-len 256 --micro-batch 4 --global-batch 32 --steps 40 --json
    batchpilot noise --model ./my-checkpoint --data corpus.jsonl --train-tokens 2T
    batchpilot noise --model runs/base --json          # at the newest checkpoint of a `batchpilot train` run

It runs the real training loop (:func:`batchpilot.train.run`, single process) for K optimizer steps at a
constant global batch from the given point of training — random init for a preset/config.json, the
weights of a local pretrained directory, or those of a ``batchpilot train`` run folder's newest good
checkpoint (B_simple grows as the loss falls, so that is the point that matters) — with
:class:`batchpilot.train.adaptive.NoiseScaleHook` measuring micro-batch vs global gradients each step.
The K per-step estimates are averaged with equal weights (β = 1), so the result describes the K-step
window; keep K small relative to training for "the current point". The report adds the steps/examples
trade-off (McCandlish et al. 2018, Eq. 2.11) for a few batches around B_crit ≈ B_simple and the
scaling-law priors (:mod:`batchpilot.plan.priors`). With ``--train-tokens`` it adds every published batch
law for the planned run (:mod:`batchpilot.plan.batch_laws`) and a whole-run batch schedule fitted from
the measurement (:mod:`batchpilot.plan.schedule_advice`): the local B_simple over a sliding window of
steps (:func:`batchpilot.estimate.noise.windowed_b_simple`) against the smoothed loss, and the loss
curve, extrapolated to the planned tokens — an extrapolation the record states.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from batchpilot.errors import BatchpilotError
from batchpilot.estimate.noise import (
    DEFAULT_EMA_DECAY,
    NoiseEstimate,
    examples_factor,
    steps_factor,
    windowed_b_simple,
)
from batchpilot.plan.batch_laws import law_inputs, predict_all
from batchpilot.plan.priors import (
    deepseek_batch_tokens,
    deepseek_flops_per_token,
    kaplan_critical_batch_tokens,
)
from batchpilot.plan.schedule_advice import ShortRun, advise_schedule
from batchpilot.records.noise import (
    BatchLR,
    LawRow,
    NoisePriors,
    NoiseRecord,
    ScheduleAdviceRecord,
    ScheduleCost,
    TradeoffRow,
    TrajectoryPoint,
)
from batchpilot.records.train_summary import TrainSummary
from batchpilot.specs.model import ModelSpec, load_model

CANDIDATE_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
"""Batches shown in the trade-off table, as multiples of B_crit."""


@dataclass(frozen=True, kw_only=True, slots=True)
class NoiseRunSettings:
    """What ``batchpilot noise`` measures on."""

    model: str = "tiny-llama-1m"
    """Preset, config.json (random init), local pretrained directory, or a ``batchpilot train`` run folder."""
    data: str = "stdlib"
    """Training data (see ``batchpilot train --data``)."""
    tokenizer: str = "bytes"
    """Tokenizer (see ``batchpilot train --tokenizer``)."""
    seq_len: int = 256
    """Tokens per sequence."""
    micro_batch_sequences: int = 4
    """Sequences per micro-batch: B_small."""
    global_batch_sequences: int = 16
    """Sequences per optimizer step: B_big (a multiple of the micro-batch, at least 2×)."""
    steps: int = 20
    """K: optimizer steps measured."""
    seed: int = 0
    """Model init and data order."""
    lr: float = 1e-3
    """Peak learning rate of the K steps (constant after a 2-step warmup)."""
    train_tokens: float | None = None
    """Planned training tokens D, for the DeepSeek prior (optional)."""
    out: str | None = None
    """Keep the run's metrics here (default: a temporary folder)."""
    threads: int | None = None
    """CPU threads."""

    def __post_init__(self) -> None:
        if self.global_batch_sequences < 2 * self.micro_batch_sequences:
            raise BatchpilotError(
                f"noise needs two batch sizes: global batch {self.global_batch_sequences} must be at least 2 × micro "
                f"{self.micro_batch_sequences}; use --global-batch {2 * self.micro_batch_sequences} or more")
        if self.steps < 2:
            raise BatchpilotError(f"--steps {self.steps}: the band needs at least 2 steps; use --steps 20")


def _train_config(settings: NoiseRunSettings, out: str) -> Any:
    from batchpilot.train.config import TrainConfig

    return TrainConfig().replace(
        model={"model": settings.model},
        data={"data": settings.data, "tokenizer": settings.tokenizer, "seq_len": settings.seq_len},
        batch={"global_batch_sequences": settings.global_batch_sequences,
               "micro_batch_sequences": settings.micro_batch_sequences, "batch_schedule": "constant"},
        optim={"lr": settings.lr, "warmup_steps": 2, "decay": "constant"},
        run={"steps": settings.steps, "out": out, "seed": settings.seed, "threads": settings.threads,
             "val_every": 0, "val_rows": 8, "final_checkpoint": False})  # a measurement: the weights are not kept


def measure_noise(settings: NoiseRunSettings) -> NoiseRecord:
    """Run K steps and return the ``batchpilot noise --json`` record (see :func:`noise_report`)."""
    from batchpilot.train.adaptive import NoiseScaleHook
    from batchpilot.train.metrics import read_metrics
    from batchpilot.train.runner import run

    hook = NoiseScaleHook(ema_decay=1.0)
    with tempfile.TemporaryDirectory(prefix="batchpilot-noise-") as tmp:
        out = Path(settings.out or tmp)
        run(_train_config(settings, str(out)), hooks=[hook])
        summary = TrainSummary.load(out / "summary.json")
        records = read_metrics(out / "metrics.jsonl")
    if hook.last is None:
        raise BatchpilotError("no step was measured; use --steps 2 or more")
    return noise_report(hook.last, settings=settings, records=records, summary=summary)


def noise_report(estimate: NoiseEstimate, *, settings: NoiseRunSettings, records: list[dict[str, Any]],
                 summary: TrainSummary) -> NoiseRecord:
    """The record: estimate, band, trade-off table, priors, and the per-step trajectory."""
    scale = estimate.to_record()
    b_crit = estimate.b_simple_sequences
    spec = _spec(settings) if settings.train_tokens else None
    schedule, schedule_error = _schedule(settings, records, spec)
    return NoiseRecord(
        **{f.name: getattr(scale, f.name) for f in fields(scale)},
        model=settings.model, model_source=summary.model_source, data=settings.data, seq_len=settings.seq_len,
        micro_batch_sequences=settings.micro_batch_sequences, global_batch_sequences=settings.global_batch_sequences,
        seed=settings.seed, b_crit_sequences=b_crit, b_crit_tokens=estimate.b_simple_tokens,
        tradeoff=_tradeoff(b_crit, settings), priors=_priors(settings, records, spec),
        loss_first=records[0]["loss"] if records else None, loss_last=records[-1]["loss"] if records else None,
        trajectory=tuple(TrajectoryPoint(step=r["step"], loss=r["loss"], b_simple=r.get("b_simple")) for r in records),
        noise_overhead_s=sum(r.get("noise_overhead_s", 0.0) for r in records), elapsed_s=summary.elapsed_s,
        schedule=schedule, schedule_error=schedule_error)


def _tradeoff(b_crit: float, settings: NoiseRunSettings) -> tuple[TradeoffRow, ...]:
    """S/S_min = 1 + B_crit/B and E/E_min = 1 + B/B_crit (McCandlish et al. 2018, Eq. 2.11)."""
    if not math.isfinite(b_crit) or b_crit <= 0:
        return ()
    batches = sorted({max(1, round(b_crit * f)) for f in CANDIDATE_FACTORS} | {settings.global_batch_sequences})
    return tuple(TradeoffRow(batch_sequences=b, batch_tokens=b * settings.seq_len, steps_vs_min=steps_factor(b, b_crit),
                             examples_vs_min=examples_factor(b, b_crit)) for b in batches)


def _spec(settings: NoiseRunSettings) -> ModelSpec | None:
    """The measured model's architecture (a run folder's recorded one), or None when it cannot be read."""
    from batchpilot.train.run_folder import base_model

    try:
        return load_model(base_model(settings.model))
    except BatchpilotError:
        return None


def _priors(settings: NoiseRunSettings, records: list[dict[str, Any]], spec: ModelSpec | None) -> NoisePriors:
    kaplan: dict[str, Any] = {}
    loss = records[-1]["loss"] if records else None
    if isinstance(loss, (int, float)) and math.isfinite(loss):  # metrics.jsonl holds null for a non-finite loss
        kaplan = {"kaplan_b_crit_tokens": kaplan_critical_batch_tokens(loss),
                  "kaplan_note": (f"Kaplan et al. 2020 Eq. 5.1 at loss {loss:.3f} nats/token; fitted on WebText2 with "
                                  "GPT-2 tokens, so only an order of magnitude for other tokenizers")}
    if not settings.train_tokens or spec is None:
        return NoisePriors(**kaplan)
    m = deepseek_flops_per_token(num_layers=spec.num_layers, hidden_size=spec.hidden_size, seq_len=settings.seq_len)
    laws = tuple(LawRow(law=p.law, batch_tokens=p.batch_tokens, learning_rate=p.learning_rate, in_range=p.in_range,
                        note=p.note)
                 for p in predict_all(law_inputs(spec, train_tokens=settings.train_tokens, seq_len=settings.seq_len)))
    return NoisePriors(**kaplan, deepseek_b_opt_tokens=deepseek_batch_tokens(m * settings.train_tokens),
                       deepseek_note="DeepSeek LLM 2024 §3.1, B_opt = 0.2920·C^0.3271 with C = M·D", laws=laws)


def short_run(settings: NoiseRunSettings, records: list[dict[str, Any]]) -> ShortRun:
    """The measurement as a short run: windowed B_simple (window = K/4, ≥ 3 steps) and the loss averaged over
    the same window, against the tokens seen."""
    window = max(3, len(records) // 4)
    usable = [r for r in records if r.get("noise_grad_sq") is not None and r.get("noise_trace") is not None]
    b_local = windowed_b_simple([r["noise_grad_sq"] for r in usable], [r["noise_trace"] for r in usable], window)
    losses = [r["loss"] if isinstance(r["loss"], (int, float)) else math.nan for r in usable]
    smooth = [sum(losses[max(0, i + 1 - window):i + 1]) / len(losses[max(0, i + 1 - window):i + 1])
              for i in range(len(losses))]
    keep = [i for i in range(len(usable)) if i + 1 >= window]
    return ShortRun(tokens=[float(usable[i]["tokens"]) for i in keep], losses=[smooth[i] for i in keep],
                    b_simple=[b_local[i] for i in keep], batch_sequences=settings.global_batch_sequences,
                    seq_len=settings.seq_len, lr=settings.lr)


def _is_folder(model: str) -> bool:
    from batchpilot.train.run_folder import is_run_folder

    return is_run_folder(model)


def folder_short_run(model: str) -> tuple[ShortRun, float] | None:
    """A ``batchpilot train`` run folder's logged trajectory as the short run, and the tokens it trained (None for
    any other model): its running B_simple (bias-corrected EMA, β = 0.95 over the measured steps, as the runner
    logs it) at each new measurement, against the loss averaged with the same weights over the same steps. The
    run must have kept one global batch."""
    from batchpilot.train.metrics import read_metrics

    if not _is_folder(model):
        return None
    records = read_metrics(Path(model) / "metrics.jsonl")
    batches = {r.get("global_batch_sequences") for r in records}
    if len(batches) != 1:
        raise BatchpilotError(f"run folder {model!r} changed its global batch ({sorted(b for b in batches if b)}); "
                              "the short run must keep one batch (a --batch-schedule constant run)")
    summary = TrainSummary.load(Path(model) / "summary.json")
    points, last, loss_ema, weight = [], None, 0.0, 0.0
    for r in records:
        b = r.get("b_simple")
        if isinstance(b, (int, float)) and math.isfinite(b) and b > 0 and b != last and \
                isinstance(r.get("loss"), (int, float)):  # a new measurement: average the loss like B_simple
            loss_ema, weight = DEFAULT_EMA_DECAY * loss_ema + r["loss"], DEFAULT_EMA_DECAY * weight + 1.0
            points.append((float(r["tokens"]), loss_ema / weight, float(b)))
            last = b
    run = ShortRun(tokens=[t for t, _, _ in points], losses=[v for _, v, _ in points], b_simple=[b for _, _, b in points],
                   batch_sequences=int(batches.pop() or 1), seq_len=int(summary.config["data"]["seq_len"]),
                   lr=float(summary.config["optim"]["lr"]))
    return run, float(summary.tokens)


def _schedule(settings: NoiseRunSettings, records: list[dict[str, Any]],
              spec: ModelSpec | None) -> tuple[ScheduleAdviceRecord | None, str | None]:
    """The whole-run schedule for ``--train-tokens`` (None and the reason when the measurement cannot carry one).

    Fitted on a run folder's logged trajectory when ``--model`` is one (then the schedule continues after its
    tokens), else on the K measured steps. The largest batch is DeepSeek LLM's B_opt(C) for the run: the
    schedule grows with B_crit but not past the loss-optimal batch of the budget."""
    if not settings.train_tokens:
        return None, None
    m = (deepseek_flops_per_token(num_layers=spec.num_layers, hidden_size=spec.hidden_size, seq_len=settings.seq_len)
         if spec is not None else None)
    cap = max(settings.micro_batch_sequences, int(deepseek_batch_tokens(m * settings.train_tokens) / settings.seq_len)
              if m else 2**20)
    try:
        folder = folder_short_run(settings.model)
        run = folder[0] if folder else short_run(settings, records)
        advice = advise_schedule(run, train_tokens=settings.train_tokens, multiple=settings.micro_batch_sequences,
                                 max_batch=cap, model_flops_per_token=m)
    except BatchpilotError as exc:
        hint = ("" if _is_folder(settings.model) else "; fit it on more of the run: `batchpilot train --tokens "
                "<about a tenth of the run> --out runs/short`, then `batchpilot noise --model runs/short --train-tokens …`")
        return None, f"{exc}{hint}"
    done = folder[1] if folder else 0.0
    text = advice.schedule_after(done)
    first = int(text.partition(":")[2].split(",")[0].partition("=")[2])
    return ScheduleAdviceRecord(
        schedule=text, starts_after_tokens=done,
        source=(f"run folder {settings.model!r}: {len(run.tokens)} logged B_simple values" if folder
                else f"the {len(run.tokens)} measured steps (windowed B_simple)"),
        lr_first=dict(advice.lr_by_batch)[first], lr_anchor=advice.lr_anchor,
        lr_by_batch=tuple(BatchLR(batch_sequences=b, learning_rate=lr) for b, lr in advice.lr_by_batch),
        target_loss=advice.target_loss, extrapolation=advice.extrapolation,
        costs=tuple(ScheduleCost(name=c.name, steps=c.steps, tokens=c.tokens) for c in advice.costs)), None
