"""Pure helpers of the convergence benchmarks: crossings, the cluster step model, the verdict."""

from __future__ import annotations

import pytest
from benchmarks.critical_batch import QUICK, RunTrace, Setup
from benchmarks.noise_adaptive import cluster_step_s, time_to_target, verdict

CLUSTER = {"ranks": 8, "micro_batch": 8, "micro_s": 0.1, "optimizer_s": 0.01, "all_reduce_s": 0.002}


def test_crossing_interpolates_between_evaluations_and_starts_at_the_checkpoint() -> None:
    trace = RunTrace(batch=4, seed=0, lr=1e-3, evals=[(0.0, 3.0), (40.0, 2.8), (80.0, 2.6)], losses=[2.9] * 20)
    assert trace.crossing(2.7) == pytest.approx(60.0)  # halfway between 2.8 at 40 and 2.6 at 80
    assert trace.crossing(2.9) == pytest.approx(20.0)  # between the checkpoint (E = 0) and the first evaluation
    assert trace.crossing(2.5) is None
    assert trace.val_at(60.0) == pytest.approx(2.7) and trace.val_at(100.0) is None
    assert trace.train_loss_at(80.0, window=16) == pytest.approx(2.9)


def test_lr_rule_is_square_root_and_capped() -> None:
    s = Setup()
    assert s.lr(s.base_batch) == s.base_lr
    assert s.lr(4 * s.base_batch) == pytest.approx(2 * s.base_lr)
    assert s.lr(10**6) == s.lr_cap
    assert all(len(b) >= 6 for b in s.batches) and len(s.checkpoints) >= 3 and len(QUICK.checkpoints) >= 3


def test_cluster_step_counts_waves_of_ranks_times_micro() -> None:
    one_wave = 0.1 + 0.01 + 0.002
    assert cluster_step_s(8, CLUSTER) == pytest.approx(one_wave)
    assert cluster_step_s(64, CLUSTER) == pytest.approx(one_wave)  # 8 ranks × 8 sequences: still one wave
    assert cluster_step_s(65, CLUSTER) == pytest.approx(one_wave + 0.1)
    assert cluster_step_s(256, CLUSTER) == pytest.approx(4 * 0.1 + 0.012)


def _records(val: list[float]) -> list[dict[str, float]]:
    return [{"step": i + 1, "tokens": 1000.0 * (i + 1), "elapsed_s": 2.0 * (i + 1), "cpu_s": float(i + 1),
             "cluster_s": 0.5 * (i + 1), "val_loss": v} for i, v in enumerate(val)]


def test_time_to_target_interpolates_every_clock() -> None:
    hit = time_to_target(_records([3.0, 2.6, 2.4]), 2.5)
    assert hit == {"wall_s": 5.0, "cpu_s": 2.5, "steps": 2.5, "tokens": 2500.0, "cluster_s": 1.25}
    assert time_to_target(_records([3.0, 2.9]), 2.5) is None


def test_verdict_compares_adaptive_with_the_fastest_fixed_batch_on_the_cluster() -> None:
    def run(cluster_s: float, tokens: float) -> dict[str, object]:
        return {"reached": {"cluster_s": cluster_s, "tokens": tokens}}

    results = {"_cluster": CLUSTER, "fixed-8": run(10.0, 100.0), "fixed-64": run(4.0, 400.0),
               "adaptive-8-64": run(3.0, 450.0)}
    text = verdict(results)
    assert "(fixed-64)" in text and "0.75× its cluster time with 1.12× its tokens" in text and "is met" in text
    results["adaptive-8-64"] = run(5.0, 200.0)
    assert "not met" in verdict(results)
