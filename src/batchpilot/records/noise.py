"""The noise records: a gradient-noise-scale estimate (:class:`NoiseScale`) and a measurement run's record
(:class:`NoiseRecord`, ``noise.json`` and the ``batchpilot noise --json`` object).

:meth:`batchpilot.estimate.noise.NoiseEstimate.to_record` builds a :class:`NoiseScale` (a training run's
``summary.json`` holds one under ``noise_scale``); :func:`batchpilot.tune.noise_run.measure_noise` builds a
:class:`NoiseRecord`, which ``plan --noise FILE``, ``tune`` and the report read back with :meth:`NoiseRecord.load`.
B counts sequences; ∞ (a noise-dominated gradient, an unbounded band) is ``null`` in the JSON.

    >>> band = NoiseBand(sequences=(10.0, 40.0), tokens=(640.0, 2560.0), level=0.95, ratio=4.0)
    >>> scale = NoiseScale(steps_measured=8, effective_steps=8.0, grad_sq_norm=0.5, trace_cov=10.0,
    ...                    tokens_per_sequence=64.0, b_simple_sequences=20.0, b_simple_tokens=1280.0, band=band,
    ...                    confident=False)
    >>> scale.band.sequences
    (10.0, 40.0)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from batchpilot.records.base import EXTRA, JsonValue, Record

SCHEMA_VERSION = 1


@dataclass(frozen=True, kw_only=True, slots=True)
class NoiseBand(JsonValue):
    """The uncertainty band of B_simple (:mod:`batchpilot.estimate.noise`: delta method on log(T̄/Ḡ))."""

    sequences: tuple[float, float]
    """(lower, upper) in sequences; upper ∞ while the estimate is unbounded."""
    tokens: tuple[float, float]
    """(lower, upper) in tokens."""
    level: float
    """Coverage of the band (0.95)."""
    ratio: float
    """upper / lower (1 = exact, ∞ = unknown)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class NoiseScale(JsonValue):
    """B_simple = tr(Σ)/|G|² with its band (McCandlish et al. 2018, App. A.1), as the estimator last gave it."""

    steps_measured: int
    """Optimizer steps measured."""
    effective_steps: float
    """n_eff = (Σw)²/Σw² of the averaging weights."""
    grad_sq_norm: float
    """Averaged unbiased estimate of |G|²."""
    trace_cov: float
    """Averaged unbiased estimate of tr(Σ) (per sequence)."""
    tokens_per_sequence: float
    """Averaged loss tokens per sequence."""
    b_simple_sequences: float
    """B_simple in sequences; ∞ while |G|² ≤ 0 (noise-dominated)."""
    b_simple_tokens: float
    """B_simple in tokens: sequences × loss tokens per sequence."""
    band: NoiseBand
    """The 95% band."""
    confident: bool
    """The band's upper/lower ratio is within the estimator's limit."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TradeoffRow(JsonValue):
    """Steps and examples at one global batch B, relative to their minimum (McCandlish et al. 2018, Eq. 2.11)."""

    batch_sequences: int
    """B in sequences."""
    batch_tokens: int
    """B in tokens (B × sequence length)."""
    steps_vs_min: float
    """S/S_min = 1 + B_crit/B."""
    examples_vs_min: float
    """E/E_min = 1 + B/B_crit."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LawRow(JsonValue):
    """One published batch-size law's prediction for the planned run (:mod:`batchpilot.plan.batch_laws`)."""

    law: str
    """The law's key (``deepseek-llm-2024``, ``step-law-2025``, ``zhang-cbs-2024``, ``kaplan-2020``)."""
    batch_tokens: float
    """Its global batch, in tokens."""
    learning_rate: float | None
    """Its peak LR, where the law has one."""
    in_range: bool
    """Whether the run lies inside the law's fitted range."""
    note: str
    """What lies outside the fitted range, or the loss the law assumed."""


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchLR(JsonValue):
    """The learning rate that goes with one batch of a schedule."""

    batch_sequences: int
    learning_rate: float


@dataclass(frozen=True, kw_only=True, slots=True)
class ScheduleCost(JsonValue):
    """Steps and tokens a batch policy needs to reach the whole run's predicted loss (McCandlish et al. 2018)."""

    name: str
    """``schedule`` or ``fixed-B``."""
    steps: float
    tokens: float


@dataclass(frozen=True, kw_only=True, slots=True)
class ScheduleAdviceRecord(JsonValue):
    """A whole-run batch schedule fitted from the measurement (:mod:`batchpilot.plan.schedule_advice`)."""

    schedule: str
    """``--batch-schedule`` text (``steps:TOKENS=SEQUENCES,…``) for the run still to train."""
    starts_after_tokens: float
    """Tokens of the whole run already trained before ``schedule`` starts (a run folder's; 0 for a fresh run)."""
    source: str
    """What the fits were made on (the K measured steps, or a run folder's logged trajectory)."""
    lr_first: float
    """``--lr`` for the first batch, with ``--lr-scaling sqrt``."""
    lr_anchor: str
    """Where the LR comes from and the rule when the batch changes."""
    lr_by_batch: tuple[BatchLR, ...]
    target_loss: float
    """The loss a run at the measured batch reaches after the planned tokens (loss-curve fit)."""
    extrapolation: str
    """How far the advice reaches beyond the measurement."""
    costs: tuple[ScheduleCost, ...]
    """The schedule and fixed batches in steps and tokens to that loss."""


@dataclass(frozen=True, kw_only=True, slots=True)
class NoisePriors(JsonValue):
    """Scaling-law priors beside the measurement (:mod:`batchpilot.plan.priors`); each is absent when it does not
    apply."""

    kaplan_b_crit_tokens: float | None = field(default=None, metadata=EXTRA)
    """Kaplan et al. 2020 Eq. 5.1 B_crit(L) at the last loss, in tokens."""
    kaplan_note: str | None = field(default=None, metadata=EXTRA)
    """How far to trust it."""
    deepseek_b_opt_tokens: float | None = field(default=None, metadata=EXTRA)
    """DeepSeek LLM 2024 §3.1 B_opt(C) for the planned training tokens (``--train-tokens``)."""
    deepseek_note: str | None = field(default=None, metadata=EXTRA)
    """The formula."""
    laws: tuple[LawRow, ...] | None = field(default=None, metadata=EXTRA)
    """Every published law of :mod:`batchpilot.plan.batch_laws` for the planned run (``--train-tokens``)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TrajectoryPoint(JsonValue):
    """One optimizer step of the measurement run."""

    step: int
    """1-based optimizer step."""
    loss: float | None
    """Training loss (nats/token); null when not finite."""
    b_simple: float | None
    """The running B_simple (sequences) after this step; null before it is defined."""


@dataclass(frozen=True, kw_only=True, slots=True)
class NoiseRecord(Record, NoiseScale):
    """A measurement of B_simple over K steps: the estimate (the :class:`NoiseScale` fields, first), the run
    it was measured on, the steps/examples trade-off, the priors and the per-step trajectory."""

    SCHEMA_VERSION: ClassVar[int] = SCHEMA_VERSION
    KIND: ClassVar[str] = "noise record"
    RERUN: ClassVar[str] = ("measure it again (`batchpilot noise --json > FILE`, or `batchpilot tune` without "
                            "--reuse)")

    model: str
    """The model as given (preset, config.json, pretrained directory or run folder)."""
    model_source: str | None
    """Where the weights came from (``random-init``, ``pretrained``, ``run:DIR@step-N``)."""
    data: str
    """The training data as given."""
    seq_len: int
    """Tokens per sequence."""
    micro_batch_sequences: int
    """B_small: sequences per micro-batch."""
    global_batch_sequences: int
    """B_big: sequences per optimizer step."""
    seed: int
    """Model init and data order."""
    b_crit_sequences: float
    """B_crit ≈ B_simple, in sequences."""
    b_crit_tokens: float
    """B_crit in tokens."""
    tradeoff: tuple[TradeoffRow, ...]
    """S/S_min and E/E_min at a few batches around B_crit (empty when B_crit is not finite)."""
    priors: NoisePriors
    """Scaling-law priors."""
    loss_first: float | None
    """Loss of the first measured step."""
    loss_last: float | None
    """Loss of the last measured step."""
    trajectory: tuple[TrajectoryPoint, ...]
    """Every step's loss and running B_simple."""
    noise_overhead_s: float
    """Seconds the gradient-norm measurement added to the run."""
    elapsed_s: float | None
    """Wall time of the training steps."""
    schedule: ScheduleAdviceRecord | None = field(default=None, metadata=EXTRA)
    """The whole-run schedule fitted from this measurement (``--train-tokens``)."""
    schedule_error: str | None = field(default=None, metadata=EXTRA)
    """Why no schedule could be fitted from this measurement."""
