"""The runner measures the gradient noise scale by default: when, what it writes, and that it changes nothing.

Numbers here are not pinned to published values: the claims are equalities (bit-identical losses and
weights with and without the hook, an exact resume) and the install rules of ``train/noise_default.py``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from train_helpers import small_config
from typer.testing import CliRunner

from batchpilot.cli import app
from batchpilot.errors import BatchpilotError
from batchpilot.train.adaptive import NoiseScaleHook
from batchpilot.train.config import DEFAULT_NOISE_EVERY, TrainConfig
from batchpilot.train.distributed import init_distributed, shutdown, unwrap
from batchpilot.train.hooks import BaseHook
from batchpilot.train.loop import Trainer
from batchpilot.train.metrics import read_metrics
from batchpilot.train.noise_default import default_noise_hook
from batchpilot.train.runner import run
from batchpilot.train.validate import check_static

NOISE_FIELDS = ("b_simple", "b_simple_tokens", "b_simple_lo", "b_simple_hi", "noise_grad_sq", "noise_trace")


def _accum2(corpus: Path, out: Path, every: int, **run_fields: Any) -> TrainConfig:
    """tiny-llama-1m on CPU, global batch 8 = micro 4 × accumulation 2."""
    return small_config(corpus, out, batch={"micro_batch_sequences": 4},
                        run={"steps": 4, "noise_every": every, **run_fields})


def _train_in_process(config: TrainConfig) -> tuple[Trainer, dict[str, Any]]:
    env = init_distributed(expected_world_size=None, device="cpu")
    try:
        trainer = Trainer(config, env)
        return trainer, trainer.train()
    finally:
        shutdown()


def test_the_hook_changes_no_loss_and_no_weight(corpus_dir: Path, tmp_path: Path) -> None:
    with_hook, summary = _train_in_process(_accum2(corpus_dir, tmp_path / "on", every=1))
    without, summary_off = _train_in_process(_accum2(corpus_dir, tmp_path / "off", every=0))
    assert isinstance(with_hook.hooks[-1], NoiseScaleHook) and without.hooks == []
    on, off = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("on", "off"))
    assert [r["grad_accum"] for r in on] == [2] * 4
    for key in ("loss", "grad_norm", "lr"):  # bit for bit: == on floats, not approx
        assert [r[key] for r in on] == [r[key] for r in off]
    weights_on, weights_off = (unwrap(t.model).state_dict() for t in (with_hook, without))
    assert all(torch.equal(weights_on[k], weights_off[k]) for k in weights_off)
    moments_on, moments_off = (t.optimizer.state_dict()["state"] for t in (with_hook, without))
    assert all(torch.equal(moments_on[i]["exp_avg_sq"], moments_off[i]["exp_avg_sq"]) for i in moments_off)
    # what the hook adds: the fields on every record; step 1 too (its first micro-step is read from p.grad)
    assert all(k in r for r in on for k in NOISE_FIELDS) and not any("b_simple" in r for r in off)
    assert all(math.isfinite(r["noise_trace"]) for r in on)
    noise = summary["noise_scale"]
    assert noise["every"] == 1 and noise["steps_measured"] == 4
    assert noise["b_simple_sequences"] == on[-1]["b_simple"] and noise["b_simple_tokens"] == on[-1]["b_simple_tokens"]
    assert noise["band"]["sequences"] == [on[-1]["b_simple_lo"], on[-1]["b_simple_hi"]]
    assert summary_off["noise_scale"] == {"every": 0, "note": "off (--noise-every 0 / --no-noise)"}


def test_default_interval_measures_one_step_in_n(corpus_dir: Path, tmp_path: Path) -> None:
    steps = 2 * DEFAULT_NOISE_EVERY + 1
    summary = run(_accum2(corpus_dir, tmp_path / "out", every=DEFAULT_NOISE_EVERY, steps=steps))
    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    # steps (0-based) 0, N, 2N are measured; step 0 attaches the hooks and is measured through p.grad
    assert summary["noise_scale"]["steps_measured"] == 3
    changed = [r["step"] for prev, r in zip([{}, *records], records, strict=False)
               if r.get("noise_trace") != prev.get("noise_trace")]
    assert changed == [1, DEFAULT_NOISE_EVERY + 1, 2 * DEFAULT_NOISE_EVERY + 1]


class _Caller(BaseHook):
    def state_dict(self) -> dict[str, Any]:
        return {"caller": 1}

    def load_state_dict(self, state: Any) -> None:
        assert state == {"caller": 1}
        self.loaded = True


def test_resume_is_exact_and_restores_the_estimator(corpus_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = _accum2(corpus_dir, out, every=2, steps=6, checkpoint_every=3)
    full_summary = run(cfg, hooks=[_Caller()])
    full = read_metrics(out / "metrics.jsonl")
    state = torch.load(out / "checkpoints" / "step-00000003" / "train.pt", weights_only=True)["state"]
    (out / "checkpoints" / "latest").write_text("step-00000003")
    caller = _Caller()
    resumed_summary = run(cfg.replace(run={"resume": True}), hooks=[caller])
    resumed = read_metrics(out / "metrics.jsonl")
    assert getattr(caller, "loaded", False)  # each hook got the state saved under its own key
    assert state["hooks"]["_Caller"] == {"caller": 1} and "estimator" in state["hooks"]["noise_scale"]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    for key in ("b_simple", "b_simple_lo", "b_simple_hi", "noise_trace", "noise_grad_sq"):
        # null (an unbounded band) stays null; numbers may differ in the last bit (sums in another order)
        got, want = [r[key] for r in resumed], [r[key] for r in full]
        assert [g is None for g in got] == [w is None for w in want]
        assert [g for g in got if g is not None] == pytest.approx([w for w in want if w is not None], rel=1e-12)
    assert resumed_summary["noise_scale"]["steps_measured"] == full_summary["noise_scale"]["steps_measured"] == 3


def _plan(config: TrainConfig, world: int) -> Any:
    return check_static(config, world)


@pytest.mark.parametrize(("batch", "run_fields", "world", "installed", "note"), [
    ({"global_batch_sequences": 8, "micro_batch_sequences": 4}, {}, 1, True, "one step in 4"),
    ({"global_batch_sequences": 8, "micro_batch_sequences": 8}, {}, 1, False, "use --micro-batch 4 or smaller"),
    ({"global_batch_sequences": 8, "micro_batch_sequences": 4}, {}, 2, True, "one step in 4"),  # accum 1 × dp 2
    ({"global_batch_sequences": 8, "micro_batch_sequences": 4}, {"noise_every": 0}, 1, False, "off (--noise-every 0"),
    ({"global_batch_sequences": 8, "micro_batch_sequences": 4}, {"fsdp": True}, 2, True, "one step in 4"),  # FSDP2: norms of unsharded and sharded grads
    ({"global_batch_sequences": 16, "micro_batch_sequences": 4, "batch_schedule": "ramp:start=4,increment=4,over=1K"},
     {}, 1, True, "one step in 4"),  # the ramp's first step is one micro-batch: that step is left out
    ({"global_batch_sequences": 8, "micro_batch_sequences": 4, "batch_schedule": "adaptive"}, {}, 1, False,
     "already installed"),
])
def test_install_rules(tmp_path: Path, batch: dict[str, Any], run_fields: dict[str, Any], world: int, installed: bool,
                       note: str) -> None:
    cfg = TrainConfig().replace(data={"seq_len": 32}, batch=batch, run={"out": str(tmp_path), **run_fields})
    plan = _plan(cfg, world)
    existing = getattr(plan.schedule, "required_hooks", list)()
    setup = default_noise_hook(cfg, plan, world, existing)
    assert (setup.hook is not None) == installed and note in setup.note
    if setup.hook is not None:
        assert setup.hook.every == DEFAULT_NOISE_EVERY and setup.hook.skip_single_micro_batch


def test_tensor_parallel_runs_do_not_measure(tmp_path: Path) -> None:
    """Tensor parallelism splits each rank's micro-batch gradient: off, with the reason."""
    cfg = TrainConfig().replace(data={"seq_len": 32}, batch={"global_batch_sequences": 8, "micro_batch_sequences": 4},
                                run={"out": str(tmp_path)}, parallel={"zero_stage": 3, "tp": 2})
    setup = default_noise_hook(cfg, _plan(cfg, 4), 2, [])
    assert setup.hook is None and "tensor parallelism (--tp 2)" in setup.note


def test_a_caller_noise_hook_is_never_doubled(corpus_dir: Path, tmp_path: Path) -> None:
    mine = NoiseScaleHook(ema_decay=1.0)
    summary = run(_accum2(corpus_dir, tmp_path / "out", every=1, steps=3), hooks=[mine])
    assert mine.estimator.steps == 3 and summary["noise_scale"]["steps_measured"] == 3
    assert "already installed" in summary["noise_scale"]["note"]


def test_single_micro_batch_steps_of_a_ramp_are_left_out(corpus_dir: Path, tmp_path: Path) -> None:
    cfg = small_config(corpus_dir, tmp_path / "out", batch={
        "global_batch_sequences": 8, "micro_batch_sequences": 4, "batch_schedule": "ramp:start=4,increment=4,over=64"},
        run={"steps": 4, "noise_every": 1})
    summary = run(cfg)
    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert records[0]["grad_accum"] == 1 and records[-1]["grad_accum"] == 2
    assert summary["noise_scale"]["steps_measured"] == sum(r["grad_accum"] == 2 for r in records[1:])


runner = CliRunner()


def test_cli_flags(corpus_dir: Path, tmp_path: Path) -> None:
    base = ["train", "--threads", "1", "--data", str(corpus_dir), "--seq-len", "32", "--global-batch", "8",
            "--micro-batch", "4", "--steps", "2", "--json"]
    result = runner.invoke(app, [*base, "--no-noise", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["noise_scale"]["every"] == 0
    result = runner.invoke(app, [*base, "--noise-every", "1", "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["config"]["run"]["noise_every"] == 1 and summary["noise_scale"]["steps_measured"] == 2
    for bad, message in ((["--no-noise", "--noise-every", "3"], "give --no-noise or --noise-every 3, not both"),
                         (["--noise-every", "-1"], "--noise-every -1 must be ≥ 0")):
        result = runner.invoke(app, [*base, *bad, "--out", str(tmp_path / "c")])
        assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "c").exists()


_RUN = ("import json, sys; from batchpilot.train.config import TrainConfig; from batchpilot.train.runner import run; "
        "print(json.dumps(run(TrainConfig.from_dict(json.load(open(sys.argv[1]))))['world_size']))")


@pytest.mark.slow
@pytest.mark.distributed
def test_two_torchrun_processes_measure_and_change_nothing(corpus_dir: Path, tmp_path: Path) -> None:
    """dp 2 × accumulation 1: installed by default (B_small = one rank's micro-batch); losses as without it."""
    losses = {}
    for every in (1, 0):
        out = tmp_path / f"every{every}"
        cfg = small_config(corpus_dir, out, batch={"micro_batch_sequences": 4},
                           run={"nproc": 2, "steps": 3, "noise_every": every})
        (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
        # a fresh interpreter, as in tests/convergence/test_adaptive.py (the launcher once hung inside pytest)
        proc = subprocess.run([sys.executable, "-c", _RUN, str(tmp_path / "cfg.json")], capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.strip().splitlines()[-1] == "2"  # really two processes
        records = read_metrics(out / "metrics.jsonl")
        losses[every] = [r["loss"] for r in records]
        if every:
            # accumulation 1 per rank: step 1's only micro-step is already all-reduced when the hook attaches
            assert all(math.isfinite(r["noise_trace"]) for r in records[1:])
            summary = json.loads((out / "summary.json").read_text())
            assert summary["noise_scale"]["steps_measured"] == 2
    assert losses[1] == losses[0]


def test_a_resume_with_other_hooks_is_refused_in_one_line(corpus_dir: Path, tmp_path: Path) -> None:
    """A checkpoint with the noise hook's state resumed with --no-noise (or the reverse) is refused: the state
    is neither dropped silently nor given to another hook (states were once matched by position)."""
    out = tmp_path / "out"
    cfg = _accum2(corpus_dir, out, every=2, steps=3, checkpoint_every=3)
    run(cfg, hooks=[_Caller()])
    with pytest.raises(BatchpilotError, match=r"hooks \['_Caller', 'noise_scale'\] but this run has \['_Caller'\]"):
        run(cfg.replace(run={"resume": True, "steps": 4, "noise_every": 0}), hooks=[_Caller()])
    with pytest.raises(BatchpilotError, match=r"hooks \['_Caller', 'noise_scale'\] but this run has \['noise_scale'\]"):
        run(cfg.replace(run={"resume": True, "steps": 4}))
