"""The local (windowed) B_simple recovered from the running means a β = 1 measurement logs."""

from __future__ import annotations

import math
import random

import pytest

from batchpilot.errors import BatchpilotError
from batchpilot.estimate.noise import NoiseSample, NoiseScaleEstimator, two_batch_estimates, windowed_b_simple


def test_window_equals_the_ratio_of_the_steps_own_estimates() -> None:
    rng, est = random.Random(0), NoiseScaleEstimator(ema_decay=1.0)
    own, grad_running, trace_running = [], [], []
    for _ in range(12):
        sample = NoiseSample(b_small=2, b_big=8, sq_norm_small=rng.uniform(2, 3), sq_norm_big=rng.uniform(0.5, 1),
                             tokens_per_sequence=10)
        own.append(two_batch_estimates(sample))
        e = est.update(sample)
        grad_running.append(e.grad_sq_norm)
        trace_running.append(e.trace_cov)
    window = windowed_b_simple(grad_running, trace_running, 4)
    assert all(math.isnan(v) for v in window[:3])
    for t in range(3, 12):
        grads, traces = [g for g, _ in own[t - 3:t + 1]], [tr for _, tr in own[t - 3:t + 1]]
        assert window[t] == pytest.approx(sum(traces) / sum(grads), rel=1e-9)
    # the window over all steps is the running estimate itself
    assert windowed_b_simple(grad_running, trace_running, 12)[-1] == pytest.approx(est.estimate().b_simple_sequences)


def test_non_positive_window_is_nan_and_bad_inputs_raise() -> None:
    assert math.isnan(windowed_b_simple([-1.0, -1.0], [2.0, 2.0], 2)[-1])  # |G|² ≤ 0: noise-dominated
    with pytest.raises(BatchpilotError, match="window"):
        windowed_b_simple([1.0], [1.0], 0)
    with pytest.raises(BatchpilotError, match="differ in length"):
        windowed_b_simple([1.0], [1.0, 2.0], 1)
