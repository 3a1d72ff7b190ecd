"""Live gradient-noise measurement in the runner, and the adaptive global-batch schedule built on it.

Examples (CPU-sized)::

    batchpilot train --steps 200 --micro-batch 4 --global-batch 8 --batch-schedule adaptive --lr-scaling sqrt
    batchpilot train ... --batch-schedule adaptive:min=8,max=128,band=3,cooldown=10,ema=0.95

:class:`NoiseScaleHook` is a :class:`~batchpilot.train.hooks.TrainHook`. A tensor hook on every
parameter (:class:`~batchpilot.train.grad_norms.MicroGradNorms`) sees each micro-step's own gradient
before it is added into ``p.grad`` — the rank-local micro-batch gradient, also under DDP, where the
parameter hooks run before DDP's all-reduce, and under FSDP2, where they sit on the unsharded parameters and
run before the reduce-scatter (:func:`~batchpilot.train.grad_norms.gradient_leaves`; the global |g|² is the
all-reduced sum of the per-shard squares) — so B_small = one micro-batch, B_big = the global batch
(``p.grad`` in ``on_gradients``: synchronised, unscaled token-mean), and no gradient copy is kept and
DDP keeps overlapping communication with backward. Batch sizes are counted in target tokens (the loss
is a token mean) and converted to sequences with the step's mean target tokens per sequence. Micro-steps
of unequal size enter through the harmonic mean of their sizes (E mean|g_i|² = |G|² + tr Σ · mean(1/B_i)).
Across ranks, the micro-batch statistics are summed with one 3-element all-reduce, so every rank holds
the same estimate and takes the same decisions.

:class:`AdaptiveBatchSchedule` grows the global batch to track B_crit ≈ B_simple (McCandlish et al.
2018): after a step whose 95% band has its *lower* bound above the current batch (so B_crit ≈ B_simple
exceeds it at one-sided 97.5% confidence), and at least ``cooldown`` steps after the last change, the
next batch becomes ``min(max, growth × current, B_simple rounded down to micro × dp)`` if that is larger
than the current batch. It never shrinks. The earlier rule (grow only when the band's upper/lower ratio
was at most ``band``) never grew at global = 2 × micro: with two micro-batches per step the two-batch
estimator is noisy and the band stayed wider than 3× although its lower bound was far above the batch
(``benchmarks/results/noise_adaptive.md``); ``band`` now only sets the ``b_simple_confident`` flag.
Decisions carry their reason: ``grow:8->16``, ``hold:band-lower-5.2<=8``, ``hold:cooldown``, …. The micro-batch stays fixed; the loop re-derives accumulation; the LR follows
``--lr-scaling`` (use ``sqrt`` for Adam, Malladi et al. 2022). Every step's record carries ``b_simple``,
its band and ``batch_decision``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from batchpilot.errors import BatchpilotError
from batchpilot.estimate.noise import (
    DEFAULT_EMA_DECAY,
    DEFAULT_MAX_BAND_RATIO,
    NoiseEstimate,
    NoiseSample,
    NoiseScaleEstimator,
)
from batchpilot.train.grad_norms import MicroGradNorms, gradient_leaves, grads_sq_norm, local_grads_sq_norm
from batchpilot.train.hooks import BaseHook, MicroStepInfo, StepInfo
from batchpilot.train.schedule import Progress, ScheduleError
from batchpilot.units import parse_count


class NoiseScaleHook(BaseHook):
    """Measures B_simple every step (micro-batch vs global gradient) and adds it to the metrics.jsonl record."""

    requires_local_gradients = False
    name = "noise_scale"

    def __init__(self, *, ema_decay: float = DEFAULT_EMA_DECAY, max_band_ratio: float = DEFAULT_MAX_BAND_RATIO,
                 every: int = 1, skip_single_micro_batch: bool = False) -> None:
        if every < 1:
            raise BatchpilotError(f"noise measurement interval must be >= 1 step, got {every}")
        self.every = every
        """Measure on steps whose index is a multiple of this (the hooks are switched off in between)."""
        self.skip_single_micro_batch = skip_single_micro_batch
        """True: a step with one micro-batch in total (B_small = B_big) is left out instead of refused (the
        runner's default measurement, where a ramp or token-budget batching can produce such steps)."""
        self.estimator = NoiseScaleEstimator(ema_decay=ema_decay, max_band_ratio=max_band_ratio)
        self.last: NoiseEstimate | None = None
        """The estimate after the latest measured step."""
        self._meter: MicroGradNorms | None = None
        self._valid = False
        self._stats = [0.0, 0.0, 0.0]  # Σ|g_i|² (token-mean micro gradients), Σ 1/B_i (tokens), count
        self.overhead_s = 0.0
        """Wall time of this step's measurement outside backward (the tensor hooks' share is inside backward)."""

    def on_micro_step(self, model: nn.Module, info: MicroStepInfo) -> None:
        start = time.perf_counter()
        # × N_global/(world·loss_scale) → ∇ of the micro-batch loss sum; ÷ its targets → its token-mean gradient
        scale = info.grad_to_sum_factor / max(1, info.micro_target_tokens)
        if self._meter is None:  # attach on first use (also after a resume): this backward ran unseen, but on
            self._meter = MicroGradNorms(gradient_leaves(model)[0])  # micro-step 0 the accumulated gradient is
            self._meter.enabled = info.step % self.every == 0  # its gradient alone (FSDP2: kept unsharded)
            self._valid = info.micro_index == 0 and not info.grads_synced and self._meter.enabled
            self._stats = [0.0, 0.0, 0.0]
            value = local_grads_sq_norm(model) * scale * scale if self._valid else 0.0
        else:
            if info.micro_index == 0:
                self._valid, self._stats = info.step % self.every == 0, [0.0, 0.0, 0.0]
            value = self._meter.pop(scale) if self._meter.enabled else 0.0
        if self._valid and info.micro_target_tokens > 0:
            self._stats[0] += value
            self._stats[1] += 1.0 / info.micro_target_tokens
            self._stats[2] += 1.0
        self.overhead_s += time.perf_counter() - start

    def on_gradients(self, model: nn.Module, info: StepInfo) -> Mapping[str, float]:
        if self._meter is not None:  # on_gradients runs before the next step's first backward
            self._meter.enabled = (info.step + 1) % self.every == 0
        if not self._valid:  # the same on every rank, so all ranks reach the all-reduce below or none
            fields = self._fields()
            self.overhead_s = 0.0
            return fields
        start = time.perf_counter()
        stats = self._reduce(model, info)
        self._valid = False
        big = grads_sq_norm(model.parameters())
        if stats[2] == 0 or not all(math.isfinite(v) for v in (*stats, big)):  # e.g. an fp16 overflow step
            return {**self._fields(), "noise_skipped": 1.0}
        sq_small, b_small_tokens = stats[0] / stats[2], stats[2] / stats[1]  # harmonic-mean micro size
        b_big_tokens = float(info.global_target_tokens)
        if b_small_tokens >= b_big_tokens:
            if self.skip_single_micro_batch:
                fields, self.overhead_s = self._fields(), 0.0
                return fields
            raise ScheduleError(
                f"noise scale needs a micro-batch smaller than the global batch (micro {b_small_tokens:.0f} tokens, "
                f"global {b_big_tokens:.0f}); use a global batch of at least 2 × micro × dp")
        tokens_per_seq = info.global_target_tokens / info.global_batch_sequences
        sample = NoiseSample(b_small=b_small_tokens / tokens_per_seq, b_big=b_big_tokens / tokens_per_seq,
                             sq_norm_small=sq_small, sq_norm_big=big, tokens_per_sequence=tokens_per_seq)
        self.last = self.estimator.update(sample)
        self.overhead_s += time.perf_counter() - start
        fields = self._fields()
        self.overhead_s = 0.0
        return fields

    def _reduce(self, model: nn.Module, info: StepInfo) -> list[float]:
        """Sum the micro-batch statistics over ranks (one 3-element all-reduce), so all ranks agree."""
        if info.world_size == 1:
            return list(self._stats)
        tensor = torch.tensor(self._stats, dtype=torch.float64, device=next(model.parameters()).device)
        dist.all_reduce(tensor)
        return [float(v) for v in tensor.tolist()]

    def _fields(self) -> dict[str, Any]:
        est = self.last
        if est is None:
            return {"b_simple": math.nan, "noise_overhead_s": self.overhead_s}
        lo, hi = est.band_sequences
        return {"b_simple": est.b_simple_sequences, "b_simple_tokens": est.b_simple_tokens, "b_simple_lo": lo,
                "b_simple_hi": hi, "b_simple_confident": est.confident, "noise_grad_sq": est.grad_sq_norm,
                "noise_trace": est.trace_cov, "noise_overhead_s": self.overhead_s}

    def state_dict(self) -> dict[str, Any]:
        return {"estimator": self.estimator.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.estimator.load_state_dict(dict(state["estimator"]))
        self.last = self.estimator.estimate() if self.estimator.steps else None


@dataclass(frozen=True, kw_only=True, slots=True)
class AdaptiveSettings:
    """The knobs of ``--batch-schedule adaptive:...``."""

    min_sequences: int
    """Starting (and smallest) global batch."""
    max_sequences: int
    """Largest global batch."""
    max_band_ratio: float = DEFAULT_MAX_BAND_RATIO
    """The noise hook's ``b_simple_confident`` flag (band upper/lower ≤ this); growth itself asks for the band's
    lower bound above the current batch."""
    cooldown_steps: int = 10
    """Steps to wait after a change (and at the start) before the next one."""
    ema_decay: float = DEFAULT_EMA_DECAY
    """β of the noise-scale EMAs."""
    max_growth: float = 2.0
    """Largest factor of one change."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_sequences <= self.max_sequences:
            raise ScheduleError(f"adaptive schedule needs 1 <= min ({self.min_sequences}) <= max ({self.max_sequences})")
        if self.max_growth <= 1.0 or self.cooldown_steps < 0:
            raise ScheduleError(f"adaptive schedule: growth {self.max_growth} must be > 1, cooldown "
                                f"{self.cooldown_steps} >= 0")

    def describe(self) -> str:
        return (f"adaptive:min={self.min_sequences},max={self.max_sequences},band={self.max_band_ratio:g},"
                f"cooldown={self.cooldown_steps},ema={self.ema_decay:g},growth={self.max_growth:g}")


class AdaptiveBatchSchedule:
    """Grow-only global batch that tracks the measured critical batch (see module doc)."""

    def __init__(self, settings: AdaptiveSettings) -> None:
        self.settings = settings
        self.hook = NoiseScaleHook(ema_decay=settings.ema_decay, max_band_ratio=settings.max_band_ratio)
        self.current = settings.min_sequences
        self.last_change_step = 0
        self.multiple = 1
        self.hook_decision = _DecisionHook(self)

    def required_hooks(self) -> list[BaseHook]:
        """Hooks the loop must install for this schedule (the noise measurement, then the decision logger)."""
        return [self.hook, self.hook_decision]

    def global_batch(self, progress: Progress) -> int:
        self.multiple = progress.batch_multiple_sequences
        if self.current % self.multiple:
            raise ScheduleError(
                f"adaptive schedule: min batch {self.current} is not a multiple of micro × dp = {self.multiple}; "
                f"use --global-batch {max(self.multiple, self.current // self.multiple * self.multiple)}")
        return self.current

    def decide(self, step: int, estimate: NoiseEstimate | None) -> str:
        """Update the batch for the next step from ``estimate``; returns the decision as one word + reason."""
        s = self.settings
        if estimate is None:
            return "hold:no-estimate"
        if step + 1 - self.last_change_step < s.cooldown_steps:
            return "hold:cooldown"
        lower = estimate.band_sequences[0]
        if not lower > self.current:  # also NaN: no estimate yet
            return f"hold:band-lower-{lower:.3g}<={self.current}"
        target = min(s.max_sequences, int(s.max_growth * self.current), int(estimate.b_simple_sequences))
        target = target // self.multiple * self.multiple
        if target <= self.current:
            return "hold:at-target" if self.current < s.max_sequences else "hold:at-max"
        old, self.current, self.last_change_step = self.current, target, step + 1
        return f"grow:{old}->{target}"

    def observe(self, record: Mapping[str, Any]) -> None:
        return None

    def planned_batches(self) -> list[int] | None:
        return None

    def describe(self) -> str:
        return self.settings.describe()

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.describe(), "current": self.current, "last_change_step": self.last_change_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("schedule") != self.describe():
            raise ScheduleError(f"the checkpoint was written with batch schedule {state.get('schedule')!r}, this run "
                                f"asks for {self.describe()!r}; resume with the same --batch-schedule")
        self.current, self.last_change_step = int(state["current"]), int(state["last_change_step"])


class _DecisionHook(BaseHook):
    """Runs after :class:`NoiseScaleHook` in ``on_gradients``: decides the next batch, logs the decision."""

    name = "adaptive_decision"

    def __init__(self, schedule: AdaptiveBatchSchedule) -> None:
        self.schedule = schedule

    def on_gradients(self, model: nn.Module, info: StepInfo) -> Mapping[str, Any]:
        decision = self.schedule.decide(info.step, self.schedule.hook.last)
        return {"batch_decision": decision, "next_global_batch": self.schedule.current}


_KEYS = {"min": "min_sequences", "max": "max_sequences", "band": "max_band_ratio", "cooldown": "cooldown_steps",
         "ema": "ema_decay", "growth": "max_growth"}


def parse_adaptive(body: str, *, global_batch_sequences: int) -> AdaptiveBatchSchedule:
    """``adaptive[:min=B,max=B,band=R,cooldown=N,ema=β,growth=F]``; min defaults to --global-batch, max to 32 × min."""
    values: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in body.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in _KEYS:
            raise ScheduleError(f"adaptive schedule: {item!r} is not one of {', '.join(k + '=' for k in _KEYS)}")
        name = _KEYS[key.strip()]
        try:
            if name in ("min_sequences", "max_sequences"):
                values[name] = parse_count(value, f"adaptive {key}")
            else:
                values[name] = int(value) if name == "cooldown_steps" else float(value)
        except ValueError as exc:
            raise ScheduleError(f"adaptive schedule: {item!r}: {exc}") from None
    values.setdefault("min_sequences", global_batch_sequences)
    values.setdefault("max_sequences", 32 * values["min_sequences"])
    return AdaptiveBatchSchedule(AdaptiveSettings(**values))
