"""From a short measurement to a whole-run batch schedule, with its expected savings and LR per batch.

    >>> losses = [2.0 + 3.0 * (1e4 * k) ** -0.3 for k in range(1, 41)]        # a short run at B = 8
    >>> run = ShortRun(tokens=[1e4 * k for k in range(1, 41)], losses=losses, lr=3e-3,
    ...                b_simple=[8 * (loss / 2.2) ** -18 for loss in losses], batch_sequences=8, seq_len=128)
    >>> advice = advise_schedule(run, train_tokens=4e6, multiple=8, max_batch=512)
    >>> advice.schedule, round(advice.lr_first, 5), [(c.name, round(c.steps)) for c in advice.costs]
    ('steps:0=16,1486848=32', 0.00424, [('schedule', 1778), ('fixed-8', 3906), ('fixed-32', 1554)])

Inputs: a short run at batch B_m (its per-step tokens, smoothed training loss and running B_simple), the
tokens D of the whole run, the batch multiple (micro-batch × data-parallel ranks) and the largest batch.

1. **B_simple(L)**: Kaplan et al. 2020's form B(L) = B*/L^(1/α_B) (Eq. 5.1) fitted to the (loss, B_simple)
   pairs of the short run's second half (:data:`NOISE_FIT_FROM`;
   :func:`batchpilot.estimate.critical_batch.fit_noise_vs_loss`).
2. **The loss curve** L(D) = A·D^(−α) (Kaplan et al. 2020, Eq. 1.2) fitted in tokens to the short run from a
   quarter on (:func:`measured_loss_curve`): the loss a fixed-B_m run reaches at D, with the band measured by
   ``benchmarks/loss_backtest.py`` (:data:`batchpilot.estimate.loss_curve.EXPONENT_SHORTFALL`).
3. **Cost along the curve** (McCandlish et al. 2018, Eq. 2.11): to make the progress that costs dE_m
   examples at B_m, batch B needs dE = dE_m·(1 + B/B_crit)/(1 + B_m/B_crit) examples and dE/B steps,
   with B_crit = B_simple(L) at the loss reached. Integrating this along the predicted curve to the
   target loss L(D) gives steps and tokens for any fixed batch or schedule.
4. **The schedule**: start at the smallest multiple of the batch multiple ≥ the measured B_crit, double
   whenever B_crit(L) reaches twice the current batch (never shrink), up to ``max_batch``. It is written
   in ``--batch-schedule steps:TOKENS=SEQUENCES,…`` syntax (thresholds in tokens of the new run).
5. **LR per batch**: the square-root rule for Adam (Malladi et al. 2022), η(B) = η_ref·√(B/B_ref) —
   ``--lr η(B_first) --lr-scaling sqrt`` in ``batchpilot train`` — anchored where a law gives an η:
   DeepSeek LLM's η_opt(C) at its B_opt(C) (arXiv:2401.02954 §3.1) when the model is known, else the
   short run's own LR at B_m.

Known error: both fits are extrapolated beyond the short run (the report says how far); on the CPU task the
loss curve under-predicted progress by up to 0.58 nats from the first 15% of a run (the curve steepens after
a plateau; :mod:`batchpilot.estimate.loss_curve`), so the target loss is pessimistic; B_crit ≈
B_simple is McCandlish et al.'s approximation, checked on the CPU task by
``benchmarks/critical_batch.py``; the LR rule is not re-tuned per stage.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from batchpilot.errors import BatchpilotError
from batchpilot.estimate.critical_batch import NoiseLossFit, fit_noise_vs_loss
from batchpilot.estimate.loss_curve import LossCurveFit, fit_loss_curve
from batchpilot.plan.priors import deepseek_batch_tokens, deepseek_learning_rate

INTEGRATION_POINTS = 400
"""Log-spaced steps of the cost integral along the B_m run's examples."""
NOISE_FIT_FROM = 0.5
"""B_simple(L) is fitted on the measurement's second half (by tokens): the first steps from random weights
pass through a transient where B_simple does not follow the loss (measured on the CPU task: ≈ 1–1.3 sequences
while the loss fell from 6.3 to 3.0, then 1.2 → 5.7 as it fell to 2.4), and the later points are the ones
the rest of the run continues from."""
LOSS_FIT_FROM = 0.25
"""The loss curve is fitted from a quarter of the measurement on (the first, fastest drop has another shape)."""


def measured_loss_curve(tokens: Sequence[float], losses: Sequence[float]) -> LossCurveFit:
    """The loss curve of a measurement: :func:`fit_loss_curve` on its points from :data:`LOSS_FIT_FROM` of its tokens."""
    last = max(tokens)
    curve = [(t, v) for t, v in zip(tokens, losses, strict=True) if t >= LOSS_FIT_FROM * last]
    return fit_loss_curve([t for t, _ in curve], [v for _, v in curve])


@dataclass(frozen=True, kw_only=True, slots=True)
class ShortRun:
    """The measurement: one short run at a constant batch."""

    tokens: Sequence[float]
    """Tokens seen after each measured step."""
    losses: Sequence[float]
    """Training loss after each step (smoothed or not; nats per token)."""
    b_simple: Sequence[float]
    """Running B_simple (sequences) at each step (nan where not measured)."""
    batch_sequences: int
    """B_m."""
    seq_len: int
    lr: float | None = None
    """The short run's peak LR at B_m (the LR anchor when no model is given)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Cost:
    """Steps and tokens a batch policy needs to reach the target loss (McCandlish cost integral)."""

    name: str
    steps: float
    tokens: float
    final_batch: int


@dataclass(frozen=True, kw_only=True, slots=True)
class ScheduleAdvice:
    """What :func:`advise_schedule` recommends."""

    schedule: str
    """``--batch-schedule`` text."""
    stages: tuple[tuple[float, int], ...]
    """(from tokens, batch in sequences)."""
    lr_first: float
    """``--lr`` for the first batch, with ``--lr-scaling sqrt``."""
    lr_by_batch: tuple[tuple[int, float], ...]
    lr_anchor: str
    target_loss: float
    """The loss a fixed-B_m run reaches after ``train_tokens`` (the loss-curve fit)."""
    target_band: tuple[float, float]
    noise_fit: NoiseLossFit
    loss_fit: LossCurveFit
    costs: tuple[Cost, ...]
    """The schedule and fixed batches, in steps and tokens to the target loss."""
    extrapolation: str
    """How far beyond the measured losses and tokens the advice reaches."""

    def schedule_after(self, tokens: float) -> str:
        """The schedule for a new run that continues the whole run after its first ``tokens`` (e.g. ``batchpilot
        train --model RUN_DIR`` from the measurement's checkpoint): thresholds shifted, earlier stages dropped."""
        current = self.stages[0][1]
        later = []
        for start, batch in self.stages:
            if start <= tokens:
                current = batch
            else:
                later.append((round((start - tokens) / 1024) * 1024, batch))
        stages = [(0, current), *[(t, b) for t, b in later if t > 0]]
        return "steps:" + ",".join(f"{int(t)}={b}" for t, b in stages)


def _pow2_at_least(value: float, multiple: int, cap: int) -> int:
    batch = multiple
    while batch < value and batch * 2 <= cap:
        batch *= 2
    return batch


def _walk(loss_fit: LossCurveFit, noise_fit: NoiseLossFit, b_m: int, seq_len: int, start_tokens: float,
          target_tokens: float, policy: Policy) -> tuple[float, float, list[tuple[float, int]]]:
    """Integrate dE = dE_m·(1 + B/B_c)/(1 + B_m/B_c) along the B_m curve; returns (steps, examples, stages)."""
    e0, e1 = start_tokens / seq_len, target_tokens / seq_len
    grid = [e0 * (e1 / e0) ** (i / INTEGRATION_POINTS) for i in range(INTEGRATION_POINTS + 1)]
    steps, examples, stages = 0.0, e0, [(0.0, policy.first)]
    for lo, hi in itertools.pairwise(grid):
        b_c = max(noise_fit.batch(loss_fit.loss(math.sqrt(lo * hi) * seq_len)), 1e-9)
        batch = policy(b_c, examples * seq_len)
        if batch != stages[-1][1]:
            stages.append((examples * seq_len, batch))
        d_examples = (hi - lo) * (1 + batch / b_c) / (1 + b_m / b_c)
        examples, steps = examples + d_examples, steps + d_examples / batch
    return steps + e0 / b_m, examples, stages


class Policy:
    """A batch as a function of (B_crit now, tokens seen): fixed, or the doubling schedule."""

    def __init__(self, *, fixed: int | None = None, start: int = 1, cap: int = 1) -> None:
        self.fixed, self.current, self.cap = fixed, start, cap

    @property
    def first(self) -> int:
        return self.fixed if self.fixed is not None else self.current

    def __call__(self, b_crit: float, tokens: float) -> int:
        if self.fixed is not None:
            return self.fixed
        while self.current * 2 <= self.cap and b_crit >= 2 * self.current:
            self.current *= 2
        return self.current


def _lr_plan(batches: list[int], run: ShortRun, model_flops_per_token: float | None,
             train_tokens: float) -> tuple[tuple[tuple[int, float], ...], str]:
    if model_flops_per_token:
        c = model_flops_per_token * train_tokens
        ref_b, ref_lr = deepseek_batch_tokens(c) / run.seq_len, deepseek_learning_rate(c)
        anchor = (f"DeepSeek LLM η_opt(C) = {ref_lr:.3g} at its B_opt(C) = {ref_b:.3g} sequences (C = {c:.3g} "
                  "FLOPs), then η ∝ √B (Malladi et al. 2022)")
    elif run.lr:
        ref_b, ref_lr = float(run.batch_sequences), run.lr
        anchor = f"the short run's LR {ref_lr:.3g} at B = {ref_b:g}, then η ∝ √B (Malladi et al. 2022)"
    else:
        raise BatchpilotError("no LR anchor: give the model (for DeepSeek LLM's η_opt(C)) or the short run's --lr")
    return tuple((b, ref_lr * math.sqrt(b / ref_b)) for b in batches), anchor


def advise_schedule(run: ShortRun, *, train_tokens: float, multiple: int, max_batch: int,
                    model_flops_per_token: float | None = None, fixed: Sequence[int] = ()) -> ScheduleAdvice:
    """The whole-run schedule from ``run`` (module docstring); ``fixed`` adds fixed batches to the cost table."""
    if not train_tokens > max(run.tokens):
        raise BatchpilotError(f"the whole run ({train_tokens:.3g} tokens) must be longer than the measurement "
                              f"({max(run.tokens):.3g}); pass --train-tokens")
    if max_batch < multiple or multiple < 1:
        raise BatchpilotError(f"max batch {max_batch} must be >= the batch multiple {multiple} (micro × dp) >= 1")
    last = max(run.tokens)
    loss_fit = measured_loss_curve(run.tokens, run.losses)
    pairs = [(v, b) for t, v, b in zip(run.tokens, run.losses, run.b_simple, strict=True)
             if t >= NOISE_FIT_FROM * last and math.isfinite(b) and b > 0]
    noise_fit = fit_noise_vs_loss([v for v, _ in pairs], [b for _, b in pairs])
    target = loss_fit.loss(train_tokens)
    b_m, start = run.batch_sequences, min(run.tokens)
    first = _pow2_at_least(noise_fit.batch(loss_fit.loss(start)), multiple, max_batch)
    steps, examples, stages = _walk(loss_fit, noise_fit, b_m, run.seq_len, start, train_tokens,
                                    Policy(start=first, cap=max_batch))
    costs = [Cost(name="schedule", steps=steps, tokens=examples * run.seq_len, final_batch=stages[-1][1])]
    for b in sorted({b_m, *fixed, stages[-1][1]}):
        s, e, _ = _walk(loss_fit, noise_fit, b_m, run.seq_len, start, train_tokens, Policy(fixed=b))
        costs.append(Cost(name=f"fixed-{b}", steps=s, tokens=e * run.seq_len, final_batch=b))
    stages_t = tuple((round(t / 1024) * 1024.0 if i else 0.0, b) for i, (t, b) in enumerate(stages))
    lrs, anchor = _lr_plan([b for _, b in stages_t], run, model_flops_per_token, train_tokens)
    lo_l, hi_l = noise_fit.loss_range
    band = loss_fit.band(train_tokens)
    return ScheduleAdvice(
        schedule="steps:" + ",".join(f"{int(t)}={b}" for t, b in stages_t), stages=stages_t, lr_first=lrs[0][1],
        lr_by_batch=lrs, lr_anchor=anchor, target_loss=target, target_band=band,
        noise_fit=noise_fit, loss_fit=loss_fit, costs=tuple(costs),
        extrapolation=(f"tokens {train_tokens / max(run.tokens):.3g}× the measurement; loss {target:.3f} (measured "
                       f"error band {band[0]:.3f}–{band[1]:.3f}) against the B_simple fit's {lo_l:.3f}–{hi_l:.3f}"))
