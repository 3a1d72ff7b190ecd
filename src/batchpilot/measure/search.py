"""The largest micro-batch that fits: a search seeded by a prediction, driven by a "fits?" oracle.

Pure logic, no torch: :func:`search_max_micro_batch` takes the predicted maximum and an oracle
``fits(micro_batch)`` that runs (or simulates) one trial, and returns every trial in order and the
largest size that fitted. The probe (:mod:`batchpilot.measure.probe`) supplies a real oracle (one
training step under a real memory limit per call); tests supply an injected one.

The oracle returns either a plain ``bool`` or an :class:`Outcome` that may also carry the trial's
measured peak memory. With peaks *and* a budget the search extrapolates the memory line and usually
needs 2–3 trials even when the prediction is 2× off; with plain booleans it falls back to exponential
search around the prediction followed by bisection.

The policy, exactly (``lo`` = largest size seen to fit, 0 at first; ``hi`` = smallest size seen to
fail, ``cap + 1`` at first; the search ends when ``hi == lo + 1``):

1. Try the prediction, clamped to ``[1, cap]``.
2. Nothing has fitted yet (only failures). After the first failure try ``prediction − 1`` (*step
   down*: a prediction one too large is the commonest miss of a good memory model, and a trial far
   above the limit fails early in its first step, so it is cheap); after two or more, ``hi // 2``
   (*halve*: hedges a prediction up to 2× too high). When ``hi == 1`` nothing fits: the result is 0.
3. Something fitted and the memory line is known (a budget was given and a fitted trial reported its
   peak): *guided* step. The line is drawn through the two largest fitted trials with peaks
   (``peak(b) = peak_1 + (b − b_1)·slope``); with one such trial, through it with the memory model's
   per-sequence slope when the caller gives one (``slope_bytes``), else through the origin
   (``peak(b) = b · peak_1 / b_1`` — an under-estimate of the maximum whenever the fixed part of the
   memory is positive, so the first guided step does not overshoot a linear truth). When the
   estimated maximum ``e = ⌊b where peak(b) = budget⌋`` exceeds ``lo`` it is tried, clamped to
   ``hi − 1``. When ``e ≤ lo`` the line says ``lo`` is the maximum: ``lo + 1`` is tried once per
   search to *confirm* the boundary; after that, rules 4–5 apply (so a line that keeps
   under-estimating cannot cause a walk in steps of one). After two guided trials in a row failed,
   the line is not trusted any more and rules 4–5 apply from then on.
4. Something fitted, nothing failed yet, no guided or confirm step applies: gallop up from ``lo`` with
   steps 1, 2, 4, … (doubling on every gallop trial; the first, ``lo + 1``, confirms an exact
   prediction in one trial).
5. Otherwise (bracketed, no usable line): bisect, ``(lo + hi) // 2``.

Trial counts with a boolean oracle (limit L, prediction p): p = L → 2 trials (L, L + 1);
p = L + 1 → 2 (L + 1, L); p = 2L → step down, halve, then bisection; p = L/2 → gallop then
bisection (≈ 2·log2(L/2)). With a linear memory oracle: p = L → 2; p = L + 1 → 2; p = 2L → 5
(2L, 2L − 1, L − 1, L, L + 1); p = L/2 → 3 or 4 (with a correct ``slope_bytes``: L/2, L, L + 1).

Invariant (tested): the reported maximum is a size whose trial fitted, or 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from batchpilot.errors import BatchpilotError

DEFAULT_CAP = 1 << 16
"""Largest micro-batch the search will try unless told otherwise (65,536 sequences)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Outcome:
    """What one trial of a micro-batch size showed."""

    fits: bool
    """The step ran to completion within the memory budget."""
    peak_bytes: int | None = None
    """Peak memory of the step counted against the budget, when measured (only used when ``fits``)."""


Oracle = Callable[[int], "bool | Outcome"]
"""``fits(micro_batch)``: run (or simulate) a trial of that size."""

Rule = Literal["prediction", "step-down", "halve", "guided", "confirm", "gallop", "bisect"]


@dataclass(frozen=True, kw_only=True, slots=True)
class SearchStep:
    """One trial of the search, in the order it ran."""

    micro_batch: int
    """Sequences per micro-batch tried."""
    fits: bool
    peak_bytes: int | None
    rule: Rule
    """Which rule of the policy (module docstring) chose this size."""


@dataclass(frozen=True, kw_only=True, slots=True)
class SearchResult:
    """The trials of one search and what they established."""

    steps: tuple[SearchStep, ...]
    max_micro_batch: int
    """Largest size whose trial fitted (0 when none did); ``max_micro_batch + 1`` failed or is ``cap + 1``."""
    predicted_max_micro_batch: int
    cap: int

    @property
    def num_trials(self) -> int:
        return len(self.steps)

    @property
    def sizes(self) -> list[int]:
        """The micro-batch sizes tried, in order."""
        return [s.micro_batch for s in self.steps]


def estimate_max_from_peaks(points: Sequence[tuple[int, int]], budget_bytes: int,
                            slope_bytes: float | None = None) -> int | None:
    """Largest ``b`` with ``peak(b) ≤ budget`` on the line through measured ``(micro_batch, peak)`` points.

    Two or more points: the line through the two largest sizes. One point: the line through it with
    slope ``slope_bytes`` when given (> 0), else through the origin (module docstring, rule 3).
    None when the points give no usable (rising) line.
    """
    usable = sorted({b: p for b, p in points if b > 0 and p > 0}.items())
    if not usable:
        return None
    if len(usable) == 1:
        b1, p1 = usable[0]
        if slope_bytes is not None and slope_bytes > 0:
            return b1 + int((budget_bytes - p1) // slope_bytes)
        return (b1 * budget_bytes) // p1
    (b1, p1), (b2, p2) = usable[-2], usable[-1]
    if p2 <= p1:
        return None
    slope = (p2 - p1) / (b2 - b1)
    return b2 + int((budget_bytes - p2) // slope)


def _as_outcome(value: bool | Outcome) -> Outcome:
    if isinstance(value, Outcome):
        return value
    if isinstance(value, bool):
        return Outcome(fits=value)
    raise TypeError(f"a fits oracle must return bool or Outcome, got {type(value).__name__}")


@dataclass(kw_only=True, slots=True)
class _State:
    lo: int
    hi: int
    steps: list[SearchStep]
    cap: int
    gallop_step: int = 1
    confirmed: bool = False
    guided_failures_in_row: int = 0
    guided_trusted: bool = True


def _next_size(state: _State, budget_bytes: int | None, slope_bytes: float | None) -> tuple[int, Rule]:
    lo, hi = state.lo, state.hi
    if lo == 0:
        return (hi - 1, "step-down") if len(state.steps) == 1 else (max(1, hi // 2), "halve")
    peaks = [(s.micro_batch, s.peak_bytes) for s in state.steps if s.fits and s.peak_bytes is not None]
    estimate = None
    if budget_bytes is not None and peaks and state.guided_trusted:
        estimate = estimate_max_from_peaks(peaks, budget_bytes, slope_bytes)  # type: ignore[arg-type]
    if estimate is not None and estimate > lo:
        return min(estimate, hi - 1), "guided"
    if estimate is not None and not state.confirmed:
        return lo + 1, "confirm"
    if hi == state.cap + 1:
        return min(lo + state.gallop_step, hi - 1), "gallop"
    return (lo + hi) // 2, "bisect"


def _record(state: _State, size: int, rule: Rule, outcome: Outcome) -> None:
    state.steps.append(SearchStep(micro_batch=size, fits=outcome.fits, peak_bytes=outcome.peak_bytes, rule=rule))
    if outcome.fits:
        state.lo = size
    else:
        state.hi = size
    if rule == "gallop":
        state.gallop_step *= 2
    if rule == "confirm":
        state.confirmed = True
    if rule == "guided":
        state.guided_failures_in_row = 0 if outcome.fits else state.guided_failures_in_row + 1
        if state.guided_failures_in_row >= 2:
            state.guided_trusted = False


def search_max_micro_batch(
    prediction: int,
    fits: Oracle,
    *,
    budget_bytes: int | None = None,
    slope_bytes: float | None = None,
    cap: int = DEFAULT_CAP,
    on_step: Callable[[SearchStep], None] | None = None,
) -> SearchResult:
    """Find the largest micro-batch in ``[1, cap]`` that fits, seeded by ``prediction``.

    ``fits`` is called once per trial (never twice for one size); ``budget_bytes`` enables the guided
    step when the oracle reports peaks, ``slope_bytes`` (memory per sequence, from the model that made the
    prediction) shapes its first line; ``on_step`` sees each trial as it completes (progress display).
    The policy is the module docstring's; the result's maximum is always a size that fitted, or 0.
    """
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise BatchpilotError(f"search cap must be a positive integer, got {cap!r}")
    if isinstance(prediction, bool) or not isinstance(prediction, int):
        raise BatchpilotError(f"predicted max micro-batch must be an integer, got {prediction!r}")
    state = _State(lo=0, hi=cap + 1, steps=[], cap=cap)
    size = min(max(prediction, 1), cap)
    rule: Rule = "prediction"
    while True:
        outcome = _as_outcome(fits(size))
        _record(state, size, rule, outcome)
        if on_step is not None:
            on_step(state.steps[-1])
        if state.hi <= state.lo + 1 or state.hi == 1:
            break
        size, rule = _next_size(state, budget_bytes, slope_bytes)
    return SearchResult(steps=tuple(state.steps), max_micro_batch=state.lo,
                        predicted_max_micro_batch=prediction, cap=cap)
