"""The gradient-noise-scale estimator against closed forms (McCandlish et al. 2018, App. A.1)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from batchpilot.errors import BatchpilotError
from batchpilot.estimate.noise import (
    NoiseSample,
    NoiseScaleEstimator,
    examples_factor,
    steps_factor,
    two_batch_estimates,
)
from batchpilot.train.grad_norms import MicroGradNorms, grads_sq_norm

from .linreg import LinReg, loss_sum

HERE = Path(__file__).resolve().parent


def _expected_sample(grad_sq: float, trace: float, b_small: float, b_big: float) -> NoiseSample:
    """E|g_B|² = |G|² + tr Σ / B (McCandlish et al. 2018, Eq. A.1) at both batch sizes."""
    return NoiseSample(b_small=b_small, b_big=b_big, sq_norm_small=grad_sq + trace / b_small,
                       sq_norm_big=grad_sq + trace / b_big, tokens_per_sequence=512.0)


def test_two_batch_formulas_invert_the_expectation() -> None:
    grad_sq, trace = two_batch_estimates(_expected_sample(0.3, 45.0, b_small=4, b_big=32))
    assert grad_sq == pytest.approx(0.3, rel=1e-12)
    assert trace == pytest.approx(45.0, rel=1e-12)


def test_estimate_in_sequences_and_tokens_and_ema_bias_correction() -> None:
    est = NoiseScaleEstimator(ema_decay=0.9)
    first = est.update(_expected_sample(0.3, 45.0, b_small=4, b_big=32))
    # Bias-corrected: one step already gives the input, not (1 − β)·input.
    assert first.b_simple_sequences == pytest.approx(150.0, rel=1e-12)
    assert first.b_simple_tokens == pytest.approx(150.0 * 512, rel=1e-12)
    assert first.band_sequences == (0.0, math.inf) and not first.confident  # one step: no spread yet
    for _ in range(20):
        last = est.update(_expected_sample(0.3, 45.0, b_small=4, b_big=32))
    assert last.band_sequences[0] == pytest.approx(150.0) and last.band_sequences[1] == pytest.approx(150.0)
    assert last.confident
    # n_eff of a bias-corrected EMA with β = 0.9 after 21 steps: (1 − β^n)²(1 + β)/((1 − β)(1 − β^2n)).
    b, n = 0.9, 21
    assert last.effective_steps == pytest.approx((1 - b**n) ** 2 * (1 + b) / ((1 - b) * (1 - b ** (2 * n))))


def test_noise_dominated_estimate_is_unbounded() -> None:
    est = NoiseScaleEstimator()
    # |g_big|² above what tr Σ alone explains from |g_small|² → |G|² estimate < 0.
    out = est.update(NoiseSample(b_small=4, b_big=8, sq_norm_small=1.0, sq_norm_big=0.4, tokens_per_sequence=1))
    assert out.grad_sq_norm < 0 and math.isinf(out.b_simple_sequences) and not out.confident


def test_tradeoff_factors() -> None:
    # At B = B_crit both costs double (McCandlish et al. 2018, Eq. 2.11).
    assert steps_factor(100, 100) == 2.0 and examples_factor(100, 100) == 2.0
    assert steps_factor(25, 100) == 5.0 and examples_factor(25, 100) == 1.25


def test_state_round_trip_continues_exactly() -> None:
    samples = [_expected_sample(0.3 + 0.01 * i, 45.0 - i, 4, 32) for i in range(6)]
    a = NoiseScaleEstimator(ema_decay=0.8)
    for s in samples:
        a.update(s)
    b = NoiseScaleEstimator()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    a.update(samples[0])
    b.update(samples[0])
    assert a.estimate() == b.estimate()


@pytest.mark.parametrize("kwargs", [
    dict(b_small=8, b_big=8, sq_norm_small=1.0, sq_norm_big=1.0, tokens_per_sequence=1.0),
    dict(b_small=4, b_big=8, sq_norm_small=math.nan, sq_norm_big=1.0, tokens_per_sequence=1.0),
    dict(b_small=4, b_big=8, sq_norm_small=1.0, sq_norm_big=1.0, tokens_per_sequence=0.0),
])
def test_bad_samples_are_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(BatchpilotError):
        NoiseSample(**kwargs)


def test_micro_grad_norms_match_a_separate_backward() -> None:
    problem = LinReg(dim=5, noise_var=1.0, delta_sq=2.0)
    model, w_star = problem.make(seed=3)
    meter = MicroGradNorms(model.parameters())
    meter.enabled = False  # the hooks also see autograd.grad; keep the reference computation out
    gen = torch.Generator().manual_seed(0)
    batches = [problem.batch(w_star, 4, gen) for _ in range(3)]
    expected = []
    for x, y in batches:  # each micro-batch's gradient on its own
        (grad,) = torch.autograd.grad(loss_sum(model, x, y) / 12, [model.weight])
        expected.append(float(grad.square().sum()))
    meter.enabled = True
    got = []
    for x, y in batches:  # accumulated into .grad, measured by the hooks
        (loss_sum(model, x, y) / 12).backward()
        got.append(meter.pop(scale=3.0))
    assert got == pytest.approx([e * 9 for e in expected], rel=1e-12)
    meter.enabled = False
    assert grads_sq_norm(model.parameters()) == pytest.approx(
        float(sum(torch.autograd.grad(loss_sum(model, x, y) / 12, [model.weight])[0] for x, y in batches)
              .square().sum()), rel=1e-12)
    meter.remove()


def _single_process_b_simple(problem: LinReg, micro: int, accum: int, steps: int, seed: int) -> tuple[float, tuple[float, float]]:
    """Plain-mean estimate (β = 1) at fixed parameters from micro-batch vs accumulated gradients."""
    model, w_star = problem.make(seed)
    gen = torch.Generator().manual_seed(10_000 + seed)
    meter = MicroGradNorms(model.parameters())
    est = NoiseScaleEstimator(ema_decay=1.0)
    for _ in range(steps):
        model.zero_grad()
        small = 0.0
        for _ in range(accum):
            x, y = problem.batch(w_star, micro, gen)
            (loss_sum(model, x, y) / (micro * accum)).backward()  # normalised by the global batch
            small += meter.pop(scale=accum) / accum  # ×accum turns it back into the micro-batch mean
        est.update(NoiseSample(b_small=micro, b_big=micro * accum, sq_norm_small=small,
                               sq_norm_big=grads_sq_norm(model.parameters()), tokens_per_sequence=1.0))
    out = est.estimate()
    return out.b_simple_sequences, out.band_sequences


@pytest.mark.parametrize("problem", [LinReg(dim=16, noise_var=4.0, delta_sq=1.0),   # B_simple = 81
                                     LinReg(dim=8, noise_var=1.0, delta_sq=0.05)])  # B_simple = 169
def test_single_process_recovers_closed_form_b_simple(problem: LinReg) -> None:
    got, (lo, hi) = _single_process_b_simple(problem, micro=8, accum=8, steps=600, seed=1)
    assert got == pytest.approx(problem.b_simple, rel=0.10)
    assert lo <= problem.b_simple <= hi


@pytest.mark.slow
@pytest.mark.distributed
def test_two_torchrun_processes_recover_closed_form_b_simple(tmp_path: Path) -> None:
    out = tmp_path / "ddp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HERE / "ddp_linreg_worker.py"), str(out), "1500"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["world_size"] == 2  # really two processes, not a silent single one
    lo, hi = record["band"]["sequences"]
    assert record["b_simple_sequences"] == pytest.approx(record["true_b_simple"], rel=0.10)
    assert lo <= record["true_b_simple"] <= hi
