"""LR warmup, decay and the batch scaling rule."""

from __future__ import annotations

import math

import pytest

from batchpilot.train.lr import LRSchedule


def _sched(**kw: object) -> LRSchedule:
    base = dict(peak_lr=1.0, warmup_steps=4, decay="cosine", min_lr_ratio=0.1, scaling="none",
                reference_batch_sequences=8, total_steps=100)
    base.update(kw)
    return LRSchedule(**base)  # type: ignore[arg-type]


def test_warmup_then_cosine_to_floor() -> None:
    s = _sched()
    assert s.lr(step=0, tokens_seen=0, global_batch_sequences=8) == pytest.approx(0.25 * (0.1 + 0.9))
    assert s.lr(step=50, tokens_seen=0, global_batch_sequences=8) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s.lr(step=100, tokens_seen=0, global_batch_sequences=8) == pytest.approx(0.1)


def test_linear_decay_by_tokens() -> None:
    s = _sched(decay="linear", total_steps=None, total_tokens=1000, warmup_steps=0)
    assert s.lr(step=7, tokens_seen=250, global_batch_sequences=8) == pytest.approx(0.1 + 0.9 * 0.75)


@pytest.mark.parametrize(("rule", "factor"), [("none", 1.0), ("linear", 4.0), ("sqrt", 2.0)])
def test_batch_scaling_rules(rule: str, factor: float) -> None:
    s = _sched(scaling=rule, decay="constant", warmup_steps=0)
    assert s.lr(step=3, tokens_seen=0, global_batch_sequences=32) == pytest.approx(factor)
    assert s.lr(step=3, tokens_seen=0, global_batch_sequences=8) == pytest.approx(1.0)
    assert math.isclose(s.batch_scale(2), {"none": 1.0, "linear": 0.25, "sqrt": 0.5}[rule])
