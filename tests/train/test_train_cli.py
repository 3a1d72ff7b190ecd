"""``batchpilot train``: the --json contract, flags reaching the run, one-line errors with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from batchpilot.cli import app
from batchpilot.train.metrics import read_metrics

runner = CliRunner()


def _train(*args: str) -> object:
    return runner.invoke(app, ["train", "--threads", "1", *args])


def test_json_summary_and_flags_reach_the_run(corpus_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _train("--data", str(corpus_dir), "--seq-len", "32", "--global-batch-tokens", "256",
                    "--micro-batch", "4", "--batching", "packed", "--steps", "2", "--lr", "1e-3",
                    "--warmup-steps", "0", "--lr-decay", "constant", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    summary = json.loads(result.stdout)  # type: ignore[attr-defined]
    assert {"steps", "tokens", "final_loss", "val_loss", "tokens_per_s", "padding_fraction", "peak_memory_bytes",
            "world_size", "config"} <= set(summary)
    assert summary["steps"] == 2 and summary["config"]["batch"]["batching"] == "packed"
    records = read_metrics(out / "metrics.jsonl")
    assert [r["global_batch_sequences"] for r in records] == [8, 8]  # 256 tokens / 32
    assert [r["grad_accum"] for r in records] == [2, 2] and [r["lr"] for r in records] == [1e-3, 1e-3]
    assert records[0]["padding_fraction"] == 0.0  # packed rows are full


def test_rich_output_and_resume(corpus_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    common = ["--data", str(corpus_dir), "--seq-len", "32", "--global-batch", "4", "--out", str(out)]
    first = _train(*common, "--steps", "2")
    assert first.exit_code == 0 and "final loss" in first.stdout  # type: ignore[attr-defined]
    again = _train(*common, "--steps", "3", "--resume", "--json")
    assert again.exit_code == 0, again.output  # type: ignore[attr-defined]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]


@pytest.mark.parametrize(("args", "message"), [
    (["--data", "/no/such/dir"], "data path '/no/such/dir' does not exist"),
    (["--global-batch", "10", "--micro-batch", "4"], "global batch 10 is not divisible by micro 4 × dp 1 = 4; use --global-batch 8 or --global-batch 12"),
    (["--global-batch-tokens", "100"], "global batch 100 tokens is not a whole number of 32-token sequences"),
    (["--seq-len", "4096"], "--seq-len 4096 exceeds the model's 1024 positions"),
    (["--steps", "3", "--tokens", "1K"], "give --steps or --tokens, not both"),
    (["--batching", "bucket"], "--batching 'bucket'"),
    (["--batch-schedule", "ramp:start=3,increment=2,over=1K"], "not a whole number of increments"),
])
def test_bad_input_is_one_line_and_exit_2(corpus_dir: Path, tmp_path: Path, args: list[str], message: str) -> None:
    base = ["--data", str(corpus_dir), "--seq-len", "32", "--out", str(tmp_path / "out")]
    result = _train(*base, *args)
    assert result.exit_code == 2  # type: ignore[attr-defined]
    stderr = result.stderr.strip()  # type: ignore[attr-defined]
    assert stderr.startswith("error: ") and "\n" not in stderr and message in stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("schedule", "given", "expected"), [
    ("adaptive", None, "sqrt"), ("adaptive:max=16", "none", "none"), ("constant", None, "none")],
    ids=["adaptive-default", "adaptive-explicit", "constant-default"])
def test_lr_scaling_defaults_to_sqrt_with_the_adaptive_schedule(corpus_dir: Path, tmp_path: Path, schedule: str,
                                                                 given: str | None, expected: str) -> None:
    out = tmp_path / "out"
    extra = ["--lr-scaling", given] if given else []
    result = _train("--data", str(corpus_dir), "--seq-len", "32", "--global-batch", "4", "--micro-batch", "2",
                    "--steps", "1", "--batch-schedule", schedule, "--out", str(out), "--json", *extra)
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    assert json.loads(result.stdout)["config"]["optim"]["lr_scaling"] == expected  # type: ignore[attr-defined]


def test_a_step_saved_twice_is_not_rewritten(corpus_dir: Path, tmp_path: Path) -> None:
    """The periodic and the final save of step 2, then a resume that has nothing left to do: the complete
    ``step-00000002`` is kept as written (same inode and mtime), so no rmtree-then-rename window opens."""
    out = tmp_path / "out"
    args = ["--data", str(corpus_dir), "--seq-len", "32", "--global-batch", "4", "--micro-batch", "2", "--steps", "2",
            "--checkpoint-every", "2", "--out", str(out), "--json"]
    assert _train(*args).exit_code == 0  # type: ignore[attr-defined]
    train_pt = out / "checkpoints" / "step-00000002" / "train.pt"
    before = train_pt.stat()
    assert (out / "checkpoints" / "step-00000002" / "manifest.json").is_file()
    again = _train(*args, "--resume")
    assert again.exit_code == 0, again.output  # type: ignore[attr-defined]
    after = train_pt.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert (out / "checkpoints" / "latest").read_text() == "step-00000002"
    assert not list((out / "checkpoints").glob(".tmp-*"))
    fresh = _train(*args)  # a fresh run (no --resume) into the same --out is refused, nothing touched
    assert fresh.exit_code == 2, fresh.output  # type: ignore[attr-defined]
    assert "already holds checkpoints of a run (newest 'step-00000002'); continue it with --resume" in fresh.output
    assert train_pt.stat().st_mtime_ns == before.st_mtime_ns


def test_a_fresh_run_launching_torchrun_is_refused_before_any_process_starts(corpus_dir: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``--nproc 2 --max-restarts 1`` into an --out holding another run's checkpoints: refused by the
    launching process itself (a worker's refusal would only trigger an elastic restart that resumes that
    run). torchrun must never start: the launcher is replaced by one that fails the test if called."""
    from batchpilot.train import runner as runner_mod

    out = tmp_path / "out"
    (out / "checkpoints" / "step-00000100").mkdir(parents=True)
    (out / "checkpoints" / "step-00000100" / "train.pt").write_bytes(b"an earlier run")
    monkeypatch.setattr(runner_mod, "launch_torchrun", lambda *a, **k: pytest.fail("torchrun was started"))
    result = _train("--data", str(corpus_dir), "--seq-len", "32", "--global-batch", "4", "--steps", "2",
                    "--nproc", "2", "--max-restarts", "1", "--out", str(out))
    assert result.exit_code == 2, result.output  # type: ignore[attr-defined]
    assert result.output.count("\n") == 1 and "newest 'step-00000100'" in result.output  # type: ignore[attr-defined]


def test_an_elastic_restart_resumes_when_a_checkpoint_exists_else_starts_over(
        corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """What a worker does when torchrun restarted its group (``TORCHELASTIC_RESTART_COUNT`` = 1) and
    --resume was not given: with no checkpoint yet it trains from step 0; with one it continues from it,
    reproducing the uninterrupted run's losses. (The note goes to stderr through logging's last-resort
    handler in a real run; under pytest the root logger has pytest's handler, so it is read from caplog.)"""
    args = ["--data", str(corpus_dir), "--seq-len", "32", "--global-batch", "4", "--micro-batch", "2",
            "--checkpoint-every", "2", "--lr-decay", "constant", "--json"]  # constant: the LR does not depend on --steps
    reference = tmp_path / "reference"
    assert _train(*args, "--steps", "4", "--out", str(reference)).exit_code == 0  # type: ignore[attr-defined]
    expected = [r["loss"] for r in read_metrics(reference / "metrics.jsonl")]

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    out = tmp_path / "out"
    first = _train(*args, "--steps", "2", "--out", str(out))  # a restart before any checkpoint was written
    assert first.exit_code == 0, first.output  # type: ignore[attr-defined]
    assert "no checkpoint was written yet: starting again from step 0" in caplog.text
    assert json.loads(first.stdout)["elastic_restarts"] == 1  # type: ignore[attr-defined]
    caplog.clear()
    second = _train(*args, "--steps", "4", "--out", str(out))  # a restart after the step-2 checkpoint
    assert second.exit_code == 0, second.output  # type: ignore[attr-defined]
    assert "elastic restart 1 (torchrun --max-restarts): resuming from" in caplog.text
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["loss"] for r in records] == expected


def test_the_result_table_shows_the_noise_scale() -> None:
    from batchpilot.cli.train import _noise_row

    band = {"sequences": [1.88, 10.4]}
    assert _noise_row({"b_simple_sequences": 4.44, "band": band, "confident": False, "steps_measured": 10}) == \
        "B_simple ≈ 4.44 sequences (95% band 1.88–10.4; not yet confident, 10 steps)"
    assert _noise_row({"b_simple_sequences": 4.0, "band": {"sequences": [2.0, float("inf")]}, "confident": False,
                       "steps_measured": 2}).endswith("(95% band 2 – no upper bound yet; not yet confident, 2 steps)")
    assert _noise_row({"b_simple_sequences": None, "note": "use --micro-batch 4 or smaller"}) == \
        "use --micro-batch 4 or smaller"
    assert _noise_row(None) == "—"
