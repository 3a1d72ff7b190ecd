"""Real torchrun processes (gloo, CPU): DDP/FSDP2 gradients and losses equal the single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_loop import _full_batch_grads
from train_helpers import small_config

from batchpilot.train.distributed import CPU_ENV_FOR_TESTS, LaunchError, check_world_size
from batchpilot.train.loop import Trainer
from batchpilot.train.metrics import read_metrics
from batchpilot.train.runner import run

HERE = Path(__file__).parent


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(("mode", "hook"), [("fixed", ""), ("token-budget", ""), ("fixed", "local")])
def test_two_process_gradients_equal_full_batch(corpus_dir: Path, tmp_path: Path, mode: str, hook: str) -> None:
    cfg = small_config(corpus_dir, tmp_path / "out", batch={"micro_batch_sequences": 2, "batching": mode,
                                                           "max_tokens_per_micro_batch": 64})
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                    str(HERE / "dist_grad_worker.py"), str(tmp_path / "cfg.json"), str(tmp_path / "g.pt"),
                    *([hook] if hook else [])], check=True, env=_env(), timeout=300)
    ranks = [torch.load(tmp_path / f"g.pt.rank{r}") for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    reference = _full_batch_grads(Trainer(cfg, CPU_ENV_FOR_TESTS))
    for name, grad in ranks[0]["grads"].items():
        assert torch.allclose(grad, reference[name], rtol=1e-5, atol=1e-6), name
        assert torch.equal(grad, ranks[1]["grads"][name])  # DDP: every rank holds the same gradient
    if hook:  # the two ranks' local loss-sum gradients add up to N × the global mean gradient
        n = ranks[0]["global_targets"]
        for name, grad in reference.items():
            summed = (ranks[0]["local"][name] + ranks[1]["local"][name]) / n
            assert torch.allclose(summed, grad, rtol=1e-5, atol=1e-6), name
            assert not torch.allclose(ranks[0]["local"][name] / n, grad, rtol=1e-3, atol=1e-6) or grad.abs().max() == 0


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("fsdp", [False, True])
def test_two_processes_train_like_one(corpus_dir: Path, tmp_path: Path, fsdp: bool) -> None:
    single = small_config(corpus_dir, tmp_path / "one", batch={"micro_batch_sequences": 4})
    run(single)
    double = single.replace(run={"nproc": 2, "fsdp": fsdp, "out": str(tmp_path / "two")},
                            batch={"micro_batch_sequences": 2})
    summary = run(double)
    assert summary["world_size"] == 2
    one = read_metrics(tmp_path / "one" / "metrics.jsonl")
    two = read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["grad_accum"] for r in one] == [2, 2, 2] and [r["grad_accum"] for r in two] == [2, 2, 2]
    assert [r["global_batch_tokens"] for r in one] == [r["global_batch_tokens"] for r in two]
    assert torch.allclose(torch.tensor([r["loss"] for r in one], dtype=torch.float64),
                          torch.tensor([r["loss"] for r in two], dtype=torch.float64), rtol=1e-5, atol=0)


def test_world_size_is_asserted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(LaunchError, match="expected a world size of 2 but the launcher started 1"):
        check_world_size(2)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    with pytest.raises(LaunchError, match="SLURM started 4 tasks but WORLD_SIZE is unset"):
        check_world_size(4)
    assert check_world_size(None) == 1


@pytest.mark.slow
@pytest.mark.distributed
def test_external_torchrun_runs_the_same_command(corpus_dir: Path, tmp_path: Path) -> None:
    common = ["-m", "batchpilot.cli", "train", "--data", str(corpus_dir), "--seq-len", "32", "--global-batch", "8",
              "--micro-batch", "2", "--steps", "2", "--threads", "1", "--json"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    short = subprocess.run([*launcher, "--nproc-per-node=1", *common, "--out", str(tmp_path / "bad"),
                            "--expect-world-size", "2"], env=_env(), capture_output=True, text=True, timeout=300)
    assert short.returncode != 0
    assert "error: expected a world size of 2 but the launcher started 1 process(es)" in short.stderr
    ok = subprocess.run([*launcher, "--nproc-per-node=2", *common, "--out", str(tmp_path / "ok"),
                         "--expect-world-size", "2"], env=_env(), capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    summary = json.loads(ok.stdout[ok.stdout.index("{"):])  # only rank 0 prints
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert [r["grad_accum"] for r in read_metrics(tmp_path / "ok" / "metrics.jsonl")] == [2, 2]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("fsdp", [False, True])
def test_two_process_resume_continues_exactly(corpus_dir: Path, tmp_path: Path, fsdp: bool) -> None:
    cfg = small_config(corpus_dir, tmp_path / "out", batch={"micro_batch_sequences": 2},
                       run={"steps": 4, "checkpoint_every": 2, "nproc": 2, "fsdp": fsdp})
    run(cfg)
    full = [r["loss"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl")]
    (tmp_path / "out" / "checkpoints" / "latest").write_text("step-00000002")  # as if it died after step 3
    run(cfg.replace(run={"resume": True}))
    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["loss"] for r in records] == full
