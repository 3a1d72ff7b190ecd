"""Gradient noise scale: the two-batch-size estimator of McCandlish et al. 2018 (arXiv:1812.06162).

Pure arithmetic (no torch): a training loop measures squared gradient norms at two batch sizes on the
*same parameters* and feeds them here as :class:`NoiseSample` records; :class:`NoiseScaleEstimator`
turns them into B_simple with an uncertainty band. The torch side (hooks that measure the norms) is
:mod:`batchpilot.train.grad_norms`.

Formulas (McCandlish et al. 2018, App. A.1). With G the true gradient and Σ the per-example
covariance, the squared norm of a mean gradient over B examples has expectation
``E|g_B|² = |G|² + tr(Σ)/B``. Two batch sizes B_small < B_big give the unbiased estimates::

    |G|²  ≈ (B_big·|g_big|² − B_small·|g_small|²) / (B_big − B_small)
    tr(Σ) ≈ (|g_small|² − |g_big|²) / (1/B_small − 1/B_big)

and ``B_simple = tr(Σ)/|G|²``, estimated as ``EMA(tr Σ) / EMA(|G|²)``: separate averages of the two
unbiased estimates, because the per-step ratio is biased and heavy-tailed (|G|² of one step is often
negative). B_crit ≈ B_simple; training at batch B then needs ``S = S_min·(1 + B_crit/B)`` optimizer
steps and ``E = E_min·(1 + B/B_crit)`` examples (their Eq. 2.11).

Units: B counts sequences. B_simple in tokens is B_simple in sequences × the mean number of loss
(target) tokens per sequence — the same measurement with the batch counted in tokens, since both
estimates above are linear in 1/B.

Uncertainty band (our choice, documented here). The per-step estimates (T_t, G_t) of tr(Σ) and |G|²
are treated as independent draws (each step uses fresh data); the averages use weights w_t
(EMA: w_t = β^(n−t); β = 1: the plain mean). With the weighted means T̄, Ḡ, weighted (co)variances
and the effective number of samples n_eff = (Σw)²/Σw², the delta method on log(T̄/Ḡ) gives::

    σ²_log ≈ (Var T / T̄² + Var G / Ḡ² − 2·Cov(T, G)/(T̄·Ḡ)) / n_eff

and the band is ``B_simple · exp(±z·σ_log)`` (z = 1.96, a 95% band). It is unbounded (upper = ∞)
while Ḡ ≤ 0, T̄ ≤ 0 or n_eff < 2. Known error: the delta method assumes the averages are roughly
normal and the parameters stationary over the averaging window; in the synthetic linear-regression
test (tests/convergence) the 95% band covers the true value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from batchpilot.errors import BatchpilotError
from batchpilot.records.base import to_json
from batchpilot.records.noise import NoiseBand, NoiseScale

Z_95 = 1.959963984540054
"""Two-sided 95% normal quantile, for the band."""

DEFAULT_EMA_DECAY = 0.95
"""β of the per-step averages during training: n_eff → (1 + β)/(1 − β) = 39 steps."""

DEFAULT_MAX_BAND_RATIO = 3.0
"""An estimate is *confident* when its band's upper/lower ratio is at most this (≈ ±1.7× at 95%)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class NoiseSample:
    """One optimizer step's gradient-norm measurement, both norms taken on the same parameters."""

    b_small: float
    """Batch size (sequences) of each small-batch gradient, e.g. one micro-batch or one rank's batch."""
    b_big: float
    """Batch size (sequences) of the big-batch gradient, e.g. the accumulated / all-reduced one."""
    sq_norm_small: float
    """Mean over the small-batch gradients of |g_small|², in fp32/fp64, loss scale removed."""
    sq_norm_big: float
    """|g_big|² of the mean gradient over the big batch, loss scale removed."""
    tokens_per_sequence: float
    """Mean number of loss (target) tokens per sequence in this step, to express B in tokens."""

    def __post_init__(self) -> None:
        if not (0 < self.b_small < self.b_big):
            raise BatchpilotError(
                f"noise sample needs 0 < b_small < b_big, got b_small={self.b_small}, b_big={self.b_big}; "
                "measure the small-batch norm on a strict part of the big batch (accumulation > 1 or dp > 1)")
        values = (self.sq_norm_small, self.sq_norm_big, self.tokens_per_sequence)
        if not all(math.isfinite(v) for v in values) or self.sq_norm_small < 0 or self.sq_norm_big < 0:
            raise BatchpilotError(
                f"noise sample norms must be finite and >= 0, got small={self.sq_norm_small}, "
                f"big={self.sq_norm_big}; skip steps whose gradients overflowed (inf/nan loss scale)")
        if self.tokens_per_sequence <= 0:
            raise BatchpilotError(f"tokens_per_sequence must be > 0, got {self.tokens_per_sequence}")


def two_batch_estimates(sample: NoiseSample) -> tuple[float, float]:
    """Unbiased (|G|², tr Σ) from one sample — McCandlish et al. 2018, App. A.1 (see module doc)."""
    bs, bb = sample.b_small, sample.b_big
    grad_sq = (bb * sample.sq_norm_big - bs * sample.sq_norm_small) / (bb - bs)
    trace = (sample.sq_norm_small - sample.sq_norm_big) / (1.0 / bs - 1.0 / bb)
    return grad_sq, trace


def steps_factor(batch: float, b_crit: float) -> float:
    """S/S_min = 1 + B_crit/B: optimizer steps relative to the infinite-batch minimum (Eq. 2.11)."""
    return 1.0 + b_crit / batch


def examples_factor(batch: float, b_crit: float) -> float:
    """E/E_min = 1 + B/B_crit: examples processed relative to the tiny-batch minimum (Eq. 2.11)."""
    return 1.0 + batch / b_crit


@dataclass(frozen=True, kw_only=True, slots=True)
class NoiseEstimate:
    """The current estimate of the gradient noise scale with its band."""

    steps: int
    """Number of optimizer steps measured."""
    effective_steps: float
    """n_eff = (Σw)²/Σw² of the averaging weights."""
    grad_sq_norm: float
    """Averaged unbiased estimate of |G|²."""
    trace_cov: float
    """Averaged unbiased estimate of tr(Σ) (per sequence)."""
    tokens_per_sequence: float
    """Averaged loss tokens per sequence."""
    b_simple_sequences: float
    """B_simple = tr(Σ)/|G|² in sequences; inf while |G|² ≤ 0 (noise-dominated)."""
    band_sequences: tuple[float, float]
    """95% band (lower, upper) of B_simple in sequences."""
    confident: bool
    """True when the band's upper/lower ratio is at most the estimator's ``max_band_ratio``."""

    @property
    def b_simple_tokens(self) -> float:
        """B_simple in tokens: sequences × loss tokens per sequence."""
        return self.b_simple_sequences * self.tokens_per_sequence

    @property
    def band_tokens(self) -> tuple[float, float]:
        """95% band of B_simple in tokens."""
        lo, hi = self.band_sequences
        return lo * self.tokens_per_sequence, hi * self.tokens_per_sequence

    @property
    def band_ratio(self) -> float:
        """Upper/lower ratio of the band (1 = exact, inf = unknown)."""
        lo, hi = self.band_sequences
        return hi / lo if lo > 0 else math.inf

    def to_record(self) -> NoiseScale:
        """The typed record (:class:`batchpilot.records.noise.NoiseScale`): what ``summary.json`` and
        ``batchpilot noise --json`` hold."""
        return NoiseScale(
            steps_measured=self.steps, effective_steps=self.effective_steps, grad_sq_norm=self.grad_sq_norm,
            trace_cov=self.trace_cov, tokens_per_sequence=self.tokens_per_sequence,
            b_simple_sequences=self.b_simple_sequences, b_simple_tokens=self.b_simple_tokens,
            band=NoiseBand(sequences=self.band_sequences, tokens=self.band_tokens, level=0.95, ratio=self.band_ratio),
            confident=self.confident)

    def to_dict(self) -> dict[str, Any]:
        """:meth:`to_record` as JSON (non-finite values are null)."""
        data: dict[str, Any] = to_json(self.to_record())
        return data


_MOMENTS = ("w", "w2", "t", "g", "tt", "gg", "tg", "tok")


class NoiseScaleEstimator:
    """Running B_simple from per-step :class:`NoiseSample` s (separate weighted averages of |G|² and tr Σ).

    ``ema_decay`` β < 1 gives bias-corrected EMAs (weights β^age, normalised by their sum — exactly
    Adam's ``m_t / (1 − β^t)``); β = 1 gives the plain mean, right for a measurement at fixed parameters.
    """

    def __init__(self, *, ema_decay: float = DEFAULT_EMA_DECAY, z: float = Z_95,
                 max_band_ratio: float = DEFAULT_MAX_BAND_RATIO) -> None:
        if not 0.0 <= ema_decay <= 1.0:
            raise BatchpilotError(f"ema_decay must be in [0, 1], got {ema_decay}; 0.95 averages ~40 steps")
        if max_band_ratio <= 1.0:
            raise BatchpilotError(f"max_band_ratio must be > 1, got {max_band_ratio}")
        self.ema_decay = ema_decay
        self.z = z
        self.max_band_ratio = max_band_ratio
        self.steps = 0
        self._m = dict.fromkeys(_MOMENTS, 0.0)

    def update(self, sample: NoiseSample) -> NoiseEstimate:
        """Add one step's measurement and return the updated estimate."""
        grad_sq, trace = two_batch_estimates(sample)
        b, m = self.ema_decay, self._m
        for key, value in (("w", 1.0), ("t", trace), ("g", grad_sq), ("tt", trace * trace),
                           ("gg", grad_sq * grad_sq), ("tg", trace * grad_sq),
                           ("tok", sample.tokens_per_sequence)):
            m[key] = b * m[key] + value
        m["w2"] = b * b * m["w2"] + 1.0
        self.steps += 1
        return self.estimate()

    def estimate(self) -> NoiseEstimate:
        """The current estimate (B_simple = inf and an unbounded band before the first step)."""
        m = self._m
        if self.steps == 0:
            return NoiseEstimate(steps=0, effective_steps=0.0, grad_sq_norm=math.nan, trace_cov=math.nan,
                                 tokens_per_sequence=math.nan, b_simple_sequences=math.nan,
                                 band_sequences=(0.0, math.inf), confident=False)
        n_eff = m["w"] ** 2 / m["w2"]
        t_mean, g_mean = m["t"] / m["w"], m["g"] / m["w"]
        b_simple = t_mean / g_mean if g_mean > 0 and t_mean > 0 else math.inf
        band = self._band(t_mean, g_mean, n_eff, b_simple)
        ratio = band[1] / band[0] if band[0] > 0 else math.inf
        return NoiseEstimate(steps=self.steps, effective_steps=n_eff, grad_sq_norm=g_mean, trace_cov=t_mean,
                             tokens_per_sequence=m["tok"] / m["w"], b_simple_sequences=b_simple,
                             band_sequences=band, confident=ratio <= self.max_band_ratio)

    def _band(self, t_mean: float, g_mean: float, n_eff: float, b_simple: float) -> tuple[float, float]:
        """Delta-method band on log(T̄/Ḡ) with weighted, Bessel-corrected (co)variances (module doc)."""
        if not math.isfinite(b_simple) or n_eff < 2.0:
            return 0.0, math.inf
        m, bessel = self._m, n_eff / (n_eff - 1.0)
        var_t = max(m["tt"] / m["w"] - t_mean**2, 0.0) * bessel
        var_g = max(m["gg"] / m["w"] - g_mean**2, 0.0) * bessel
        cov = (m["tg"] / m["w"] - t_mean * g_mean) * bessel
        var_log = (var_t / t_mean**2 + var_g / g_mean**2 - 2.0 * cov / (t_mean * g_mean)) / n_eff
        half = self.z * math.sqrt(max(var_log, 0.0))
        return b_simple * math.exp(-half), b_simple * math.exp(half)

    def state_dict(self) -> dict[str, Any]:
        """Plain-JSON state for checkpoints."""
        return {"ema_decay": self.ema_decay, "z": self.z, "max_band_ratio": self.max_band_ratio,
                "steps": self.steps, "moments": dict(self._m)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (the estimate continues exactly)."""
        missing = set(_MOMENTS) - set(state.get("moments", {}))
        if missing:
            raise BatchpilotError(f"noise-estimator state lacks {sorted(missing)}; was it saved by state_dict()?")
        self.ema_decay, self.z = float(state["ema_decay"]), float(state["z"])
        self.max_band_ratio, self.steps = float(state["max_band_ratio"]), int(state["steps"])
        self._m = {k: float(state["moments"][k]) for k in _MOMENTS}


def windowed_b_simple(grad_sq_running: Sequence[float], trace_running: Sequence[float], window: int) -> list[float]:
    """B_simple over a sliding window of steps, from the plain running means (β = 1) a measurement logs.

    Step t's own unbiased estimates are recovered exactly from the running means M_t of steps 1…t:
    x_t = t·M_t − (t−1)·M_{t−1}. The window's B_simple is Σ tr(Σ) / Σ |G|² over its last ``window`` steps
    (the ratio of the two averages, as in :class:`NoiseScaleEstimator`); nan while fewer than ``window``
    steps exist or while the window's |G|² or tr(Σ) is not positive. This is the *local* noise scale a
    short run passes through, which the running mean over all steps lags behind (it weighs the first
    steps, at the highest loss, as much as the last).
    """
    if window < 1:
        raise BatchpilotError(f"window must be >= 1 step, got {window}")
    if len(grad_sq_running) != len(trace_running):
        raise BatchpilotError(f"running |G|² and tr(Σ) differ in length: {len(grad_sq_running)} vs {len(trace_running)}")

    def own(running: Sequence[float]) -> list[float]:
        return [(t + 1) * m - t * (running[t - 1] if t else 0.0) for t, m in enumerate(running)]

    grads, traces = own(grad_sq_running), own(trace_running)
    out = []
    for t in range(len(grads)):
        if t + 1 < window:
            out.append(math.nan)
            continue
        g, tr = sum(grads[t + 1 - window:t + 1]), sum(traces[t + 1 - window:t + 1])
        out.append(tr / g if g > 0 and tr > 0 else math.nan)
    return out
