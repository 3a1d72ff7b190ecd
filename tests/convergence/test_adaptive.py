"""The adaptive batch schedule: decision rule, parsing, and its run inside the real training loop."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from batchpilot.estimate.noise import NoiseEstimate
from batchpilot.train.adaptive import AdaptiveBatchSchedule, AdaptiveSettings, NoiseScaleHook, parse_adaptive
from batchpilot.train.config import TrainConfig
from batchpilot.train.data import stdlib_root
from batchpilot.train.hooks import MicroStepInfo, StepInfo
from batchpilot.train.metrics import read_metrics
from batchpilot.train.runner import run
from batchpilot.train.schedule import Progress, ScheduleError
from batchpilot.train.schedule_syntax import parse_batch_schedule

from .linreg import LinReg, loss_sum


def _estimate(b_simple: float, band_ratio: float) -> NoiseEstimate:
    half = math.sqrt(band_ratio)
    return NoiseEstimate(steps=50, effective_steps=30.0, grad_sq_norm=1.0, trace_cov=b_simple,
                         tokens_per_sequence=32.0, b_simple_sequences=b_simple,
                         band_sequences=(b_simple / half, b_simple * half), confident=band_ratio <= 3.0)


def _schedule(**kw: object) -> AdaptiveBatchSchedule:
    settings = AdaptiveSettings(**{"min_sequences": 8, "max_sequences": 64, "cooldown_steps": 0, **kw})  # type: ignore[arg-type]
    schedule = AdaptiveBatchSchedule(settings)
    schedule.global_batch(Progress(step=0, sequences_seen=0, tokens_seen=0, batch_multiple_sequences=4))
    return schedule


def test_grows_at_most_2x_per_change_and_never_shrinks() -> None:
    s = _schedule()
    assert s.decide(0, _estimate(100.0, 2.0)) == "grow:8->16"
    assert s.decide(1, _estimate(100.0, 2.0)) == "grow:16->32"
    assert s.decide(2, _estimate(5.0, 2.0)).startswith("hold") and s.current == 32  # never shrinks
    assert s.decide(3, _estimate(100.0, 2.0)) == "grow:32->64"
    assert s.decide(4, _estimate(1000.0, 2.0)) == "hold:at-max" and s.current == 64


def test_holds_in_cooldown_and_rounds_to_micro_times_dp() -> None:
    s = _schedule(cooldown_steps=5)
    assert s.decide(0, None) == "hold:no-estimate"
    assert s.decide(2, _estimate(100.0, 2.0)) == "hold:cooldown"  # 3 steps since the start < 5
    assert s.decide(4, _estimate(14.9, 2.0)) == "grow:8->12"  # 14.9 → 12 = 3 × (micro × dp = 4)
    assert s.decide(6, _estimate(100.0, 2.0)) == "hold:cooldown"
    assert s.decide(9, _estimate(100.0, 2.0)) == "grow:12->24"


def test_grows_when_the_band_lower_bound_exceeds_the_batch_however_wide_the_band() -> None:
    """The old rule (band upper/lower <= 3) never grew at global = 2 × micro, where the band stays wide."""
    s = _schedule()
    wide = _estimate(100.0, 50.0)  # band 14.1–707: 50× wide, but B_simple > 8 at 97.5% one-sided confidence
    assert not wide.confident and s.decide(0, wide) == "grow:8->16"
    assert s.decide(1, wide) == "hold:band-lower-14.1<=16"  # the lower bound no longer exceeds the batch
    assert s.decide(2, _estimate(40.0, 2.0)) == "grow:16->32"  # lower 28.3 > 16; at most 2× per change
    noise_dominated = NoiseEstimate(steps=5, effective_steps=5.0, grad_sq_norm=-1.0, trace_cov=1.0,
                                    tokens_per_sequence=32.0, b_simple_sequences=math.inf,
                                    band_sequences=(0.0, math.inf), confident=False)
    assert s.decide(3, noise_dominated).startswith("hold:band-lower-0<=")


def test_state_round_trip_and_mismatch() -> None:
    s = _schedule()
    s.decide(0, _estimate(100.0, 2.0))
    t = _schedule()
    t.load_state_dict(s.state_dict())
    assert t.current == 16 and t.last_change_step == 1
    with pytest.raises(ScheduleError, match="resume with the same"):
        _schedule(max_sequences=128).load_state_dict(s.state_dict())
    with pytest.raises(ScheduleError, match="resume with the same"):  # growth is part of the schedule
        _schedule(max_growth=4.0).load_state_dict(s.state_dict())


def test_parse_defaults_and_errors() -> None:
    s = parse_batch_schedule("adaptive", global_batch_sequences=16, seq_len_tokens=128)
    assert isinstance(s, AdaptiveBatchSchedule)
    assert (s.settings.min_sequences, s.settings.max_sequences) == (16, 512)
    s = parse_adaptive("min=8,max=1Ki,band=2.5,cooldown=0,ema=0.9,growth=1.5", global_batch_sequences=16)
    assert s.settings == AdaptiveSettings(min_sequences=8, max_sequences=1024, max_band_ratio=2.5, cooldown_steps=0,
                                          ema_decay=0.9, max_growth=1.5)
    for bad in ("minimum=8", "min=64,max=8", "growth=1"):
        with pytest.raises(ScheduleError):
            parse_adaptive(bad, global_batch_sequences=16)


def _config(out: Path) -> TrainConfig:
    return TrainConfig().replace(
        data={"data": str(stdlib_root() / "json"), "seq_len": 32, "val_fraction": 0.1},
        batch={"global_batch_sequences": 4, "micro_batch_sequences": 2,
               "batch_schedule": "adaptive:max=16,band=1e9,cooldown=2"},
        optim={"warmup_steps": 2, "lr_scaling": "sqrt"},
        run={"steps": 6, "out": str(out), "threads": 1, "val_rows": 4, "checkpoint_every": 3})


def test_runs_in_the_loop_logs_decisions_and_resumes_exactly(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(_config(out))
    full = read_metrics(out / "metrics.jsonl")
    assert all("b_simple" in r and "batch_decision" in r for r in full)
    assert all(r["b_simple"] > 0 for r in full[1:])  # step 1 attaches the hooks; measured from step 2
    batches = [r["global_batch_sequences"] for r in full]
    assert batches == sorted(batches) and all(b % 2 == 0 and 4 <= b <= 16 for b in batches)
    for prev, rec in itertools.pairwise(full):  # each batch is the previous step's decision
        assert rec["global_batch_sequences"] == prev["next_global_batch"]
        assert rec["global_batch_sequences"] <= 2 * prev["global_batch_sequences"]
    (out / "checkpoints" / "latest").write_text("step-00000003")
    run(_config(out).replace(run={"resume": True}))
    resumed = read_metrics(out / "metrics.jsonl")
    keys = ("loss", "global_batch_sequences", "batch_decision", "lr")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in full]
    # The estimate may differ in its last bit after a resume (float sums in another order); the decisions
    # it drives, the batches and the losses above are exact.
    assert [r["b_simple"] for r in resumed] == pytest.approx([r["b_simple"] for r in full], rel=1e-12)


def _drive_hook(hook: NoiseScaleHook, steps: int, *, loss_scale: float, poison_step: int | None = None) -> float:
    """The loop's contract (hooks.py) on the synthetic regression: loss × world·scale/N, unscale before on_gradients."""
    problem = LinReg(dim=16, noise_var=4.0, delta_sq=1.0)  # B_simple = 81 examples
    model, w_star = problem.make(seed=5)
    gen = torch.Generator().manual_seed(7)
    micro, accum = 8, 8
    n_global = micro * accum  # one target per example
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        for i in range(accum):
            x, y = problem.batch(w_star, micro, gen)
            (loss_sum(model, x, y) * loss_scale / n_global).backward()
            hook.on_micro_step(model, MicroStepInfo(
                step=step, micro_index=i, num_micro_steps=accum, micro_target_tokens=micro,
                local_target_tokens=n_global, global_target_tokens=n_global, micro_batch_sequences=micro,
                loss_sum=0.0, loss_scale=loss_scale, grad_to_sum_factor=n_global / loss_scale,
                grads_synced=False, rank=0, world_size=1))
        with torch.no_grad():
            model.weight.grad /= loss_scale  # GradScaler.unscale_
            if step == poison_step:
                model.weight.grad[0, 0] = math.inf
        fields = hook.on_gradients(model, StepInfo(
            step=step, global_batch_sequences=n_global, global_target_tokens=n_global, local_target_tokens=n_global,
            tokens_seen=0, loss_scale=loss_scale, grad_to_sum_factor=n_global / loss_scale, lr=0.0, rank=0,
            world_size=1))
        if step == poison_step:
            assert fields["noise_skipped"] == 1.0
    assert hook.last is not None
    return hook.last.b_simple_sequences


def test_hook_recovers_closed_form_through_the_loop_contract_with_a_loss_scale() -> None:
    hook = NoiseScaleHook(ema_decay=1.0)
    got = _drive_hook(hook, 400, loss_scale=1024.0, poison_step=17)
    assert got == pytest.approx(LinReg(dim=16, noise_var=4.0, delta_sq=1.0).b_simple, rel=0.10)
    assert hook.estimator.steps == 399  # the overflowed step was skipped, not averaged in


def test_hook_measures_every_kth_step_only() -> None:
    hook = NoiseScaleHook(ema_decay=1.0, every=4)
    got = _drive_hook(hook, 1200, loss_scale=1.0)
    assert hook.estimator.steps == 300
    assert got == pytest.approx(LinReg(dim=16, noise_var=4.0, delta_sq=1.0).b_simple, rel=0.10)


@pytest.mark.slow
@pytest.mark.distributed
def test_adaptive_under_two_torchrun_processes(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cfg = _config(out).replace(run={"nproc": 2, "steps": 4, "checkpoint_every": 0})
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    # Launched from a fresh interpreter: in a pytest process that had imported batchpilot.cli (test_cli_noise),
    # run(nproc=2) hung in the launcher (seen 2026-11-28; reported to the runner's owner).
    code = ("import json, sys; from batchpilot.train.config import TrainConfig; from batchpilot.train.runner import run; "
            "print(json.dumps(run(TrainConfig.from_dict(json.load(open(sys.argv[1]))))['world_size']))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cfg.json")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "2"  # really two processes
    records = read_metrics(out / "metrics.jsonl")
    # accumulation 1 per rank: step 1's only micro-step is already all-reduced when the hook attaches
    assert all(r["b_simple"] > 0 for r in records[1:]) and len(records) == 4
    assert all("batch_decision" in r for r in records)
