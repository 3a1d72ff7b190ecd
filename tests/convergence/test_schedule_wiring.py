"""The whole-run schedule wired into `batchpilot noise` (a run folder's logged trajectory) and tune's plan stage."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import record_samples

from batchpilot.specs.model import load_model
from batchpilot.train.schedule_syntax import parse_batch_schedule
from batchpilot.tune.noise_run import NoiseRunSettings, _schedule, folder_short_run
from batchpilot.tune.stages import _longest_stage, critical_batch_sequences

SEQ = 128


def _run_folder(tmp_path: Path) -> Path:
    """A `batchpilot train` folder whose logged B_simple grows as the loss falls: B = 8·(L/2.2)^−18."""
    folder = tmp_path / "short"
    folder.mkdir()
    lines = []
    for step in range(1, 161):
        tokens = step * 16 * SEQ
        loss = 2.0 + 30.0 * tokens**-0.3
        b = 8 * (loss / 2.2) ** -18 if step % 4 == 0 else None  # one step in 4, as the runner measures
        lines.append(json.dumps({"step": step, "tokens": tokens, "loss": loss, "global_batch_sequences": 16,
                                 "b_simple": b}))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    summary = record_samples.summary(tokens=160 * 16 * SEQ, config={
        "model": {"model": "tiny-llama-1m"}, "data": {"data": "stdlib", "seq_len": SEQ, "tokenizer": "bytes"},
        "optim": {"lr": 3e-3, "precision": "fp32"}})
    summary.save(folder / "summary.json")
    return folder


def test_a_run_folder_trajectory_gives_a_continuing_schedule(tmp_path: Path) -> None:
    folder = _run_folder(tmp_path)
    short = folder_short_run(str(folder))
    assert short is not None
    run, trained = short
    assert trained == 160 * 16 * SEQ and run.batch_sequences == 16 and run.seq_len == SEQ and len(run.tokens) == 40
    settings = NoiseRunSettings(model=str(folder), seq_len=SEQ, micro_batch_sequences=4, global_batch_sequences=16,
                                train_tokens=3e6)
    advice, error = _schedule(settings, [], load_model("tiny-llama-1m"))
    assert error is None and advice is not None
    assert advice.starts_after_tokens == trained and "run folder" in advice.source
    schedule = parse_batch_schedule(advice.schedule, global_batch_sequences=16, seq_len_tokens=SEQ)
    first = schedule.planned_batches()[0]
    assert advice.schedule.startswith(f"steps:0={first}")  # starts where the finished stages leave off
    assert advice.lr_first == next(x.learning_rate for x in advice.lr_by_batch if x.batch_sequences == first)
    assert "DeepSeek LLM" in advice.lr_anchor  # the model is known: η_opt(C) anchors the √B rule


def test_no_schedule_from_a_flat_measurement_says_why_and_how(tmp_path: Path) -> None:
    settings = NoiseRunSettings(model="tiny-llama-1m", seq_len=SEQ, micro_batch_sequences=4, global_batch_sequences=16,
                                train_tokens=3e6)
    records = [{"step": s, "tokens": s * 16 * SEQ, "loss": 3.0, "noise_grad_sq": 1.0, "noise_trace": 2.0}
               for s in range(1, 21)]
    advice, error = _schedule(settings, records, load_model("tiny-llama-1m"))
    assert advice is None and error is not None
    assert "batchpilot noise --model runs/short --train-tokens" in error


def test_tune_plans_the_longest_stage_of_the_schedule() -> None:
    assert _longest_stage("steps:0=16,2892800=32", 4e6) == 16
    assert _longest_stage("steps:0=16,1000000=32", 4e6) == 32
    from batchpilot.records.noise import ScheduleAdviceRecord
    from batchpilot.tune.config import TuneConfig
    from batchpilot.tune.stages import TuneState

    advice = ScheduleAdviceRecord(schedule="steps:0=8,100000=32", starts_after_tokens=0.0, source="test",
                                  lr_first=1e-3, lr_anchor="test", lr_by_batch=(), target_loss=2.0,
                                  extrapolation="", costs=())
    noise = replace(record_samples.noise(), schedule=advice)
    state = TuneState(model=load_model("tiny-llama-1m"), noise=noise)
    assert critical_batch_sequences(state, TuneConfig(train_tokens=1_000_000)) == 32  # 32 covers 900k of 1M tokens
    # without --train-tokens the plan keeps B_simple (no probe: knee 1)
    assert critical_batch_sequences(state, TuneConfig()) == max(1, round(noise.b_simple_sequences))
