"""The loop: accumulation equals the large batch, layouts train identically, precision, schedules, hooks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from train_helpers import small_config

from batchpilot.train.batching import MicroBatchPlan, collate
from batchpilot.train.config import ModelConfig, TrainConfig
from batchpilot.train.distributed import DistEnv
from batchpilot.train.hooks import BaseHook, MicroStepInfo, StepInfo
from batchpilot.train.loop import Trainer
from batchpilot.train.metrics import METRIC_KEYS, read_metrics
from batchpilot.train.model import build_model
from batchpilot.train.runner import run

CPU = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def _accumulated_grads(config: TrainConfig) -> tuple[dict[str, torch.Tensor], Trainer]:
    trainer = Trainer(config, CPU)
    layout = trainer._layout(config.batch.global_batch_sequences)
    trainer._accumulate(layout, lr=1e-3)
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters()}, trainer


def _full_batch_grads(trainer: Trainer, *, per_micro_mean: int = 0) -> dict[str, torch.Tensor]:
    """Independent reference: one forward over the whole global batch padded to seq_len, mean CE.

    ``per_micro_mean`` > 0 computes instead the naive accumulation (mean of per-micro-batch means),
    the thing the runner must NOT do.
    """
    cfg = trainer.config
    model = build_model(ModelConfig(), seed=cfg.run.seed).module
    rows = trainer.stream.rows(0, cfg.batch.global_batch_sequences)
    chunks = [rows] if not per_micro_mean else [rows[i:i + per_micro_mean] for i in range(0, len(rows), per_micro_mean)]
    for chunk in chunks:
        mb = collate(MicroBatchPlan(rows=tuple(chunk), pad_to=cfg.data.seq_len), trainer.corpus.tokens,
                     mode=cfg.batch.batching)
        logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids).logits
        loss = F.cross_entropy(logits.flatten(0, 1), mb.targets.flatten(), ignore_index=-100)
        (loss / len(chunks)).backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize(("mode", "micro", "budget"), [("fixed", 2, None), ("token-budget", 8, 64), ("packed", 1, None)])
def test_accumulated_gradients_equal_full_batch(corpus_dir: Path, tmp_path: Path, mode: str, micro: int,
                                                budget: int | None) -> None:
    cfg = small_config(corpus_dir, tmp_path / "out",
                       batch={"batching": mode, "micro_batch_sequences": micro, "max_tokens_per_micro_batch": budget})
    grads, trainer = _accumulated_grads(cfg)
    layout = trainer._layout(8)
    assert layout.grad_accum_steps > 1
    if mode != "packed":  # variable-length, padded rows: the case where per-micro means go wrong
        assert len({r.target_tokens for r in trainer.stream.rows(0, 8)}) > 1 and layout.padding_fraction > 0
    reference = _full_batch_grads(trainer)
    for name, grad in grads.items():
        assert torch.allclose(grad, reference[name], rtol=1e-5, atol=1e-6), name
    if mode == "fixed":  # negative control: averaging per-micro-batch means is measurably different
        naive = _full_batch_grads(trainer, per_micro_mean=micro)
        assert not all(torch.allclose(g, naive[n], rtol=1e-5, atol=1e-6) for n, g in grads.items())


def test_micro_batch_16_and_4_train_identically(corpus_dir: Path, tmp_path: Path) -> None:
    losses = {}
    for micro in (16, 4):
        cfg = small_config(corpus_dir, tmp_path / f"m{micro}", batch={"global_batch_sequences": 16,
                                                                      "micro_batch_sequences": micro})
        run(cfg)
        records = read_metrics(tmp_path / f"m{micro}" / "metrics.jsonl")
        assert [r["grad_accum"] for r in records] == [16 // micro] * 3
        losses[micro] = torch.tensor([r["loss"] for r in records], dtype=torch.float64)
    assert torch.allclose(losses[16], losses[4], rtol=1e-5, atol=0)
    assert losses[16][-1] < losses[16][0]


def test_metrics_contract_and_summary(corpus_dir: Path, tmp_path: Path) -> None:
    cfg = small_config(corpus_dir, tmp_path / "out", run={"val_every": 2})
    summary = run(cfg)
    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert set(METRIC_KEYS) <= set(r)
        assert r["global_batch_sequences"] == 8 and r["micro_batch"] == 8 and r["grad_accum"] == 1
        assert 0 <= r["padding_fraction"] < 1 and r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0
    assert records[-1]["tokens"] == sum(r["global_batch_tokens"] for r in records)
    assert "val_loss" in records[1] and "val_loss" not in records[0]
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["steps"] == summary["steps"] == 3 and on_disk["final_loss"] == records[-1]["loss"]
    assert summary["val_loss"] is not None and summary["stopped_by_signal"] is None


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_and_learns(corpus_dir: Path, tmp_path: Path, precision: str) -> None:
    cfg = small_config(corpus_dir, tmp_path / "out", optim={"precision": precision, "warmup_steps": 0})
    run(cfg)
    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    losses = [r["loss"] for r in records]
    assert all(0 < x < 10 for x in losses) and losses[-1] < losses[0]
    expected_scale = 2.0**16 if precision == "fp16" else 1.0  # GradScaler's default init_scale
    assert records[0]["loss_scale"] == expected_scale


@pytest.mark.parametrize("schedule", ["steps:0=4,200=8", "ramp:start=4,increment=4,over=200"])
def test_schedule_rederives_accumulation_and_scales_lr(corpus_dir: Path, tmp_path: Path, schedule: str) -> None:
    # 4 sequences until 200 tokens are seen, then 8 (staged: from 200; the one-increment Megatron ramp:
    # floor(tokens / 200) increments, i.e. also from 200); the micro-batch (4) stays, accumulation 1 → 2
    cfg = small_config(corpus_dir, tmp_path / "out", run={"steps": 4},
                       batch={"micro_batch_sequences": 4, "batch_schedule": schedule},
                       optim={"warmup_steps": 0, "decay": "constant", "lr_scaling": "sqrt"})
    run(cfg)
    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    expected, seen = [], 0
    for r in records:
        expected.append(4 if seen < 200 else 8)
        seen = r["tokens"]
    assert [r["global_batch_sequences"] for r in records] == expected and expected[0] == 4 and expected[-1] == 8
    assert [r["grad_accum"] for r in records] == [b // 4 for b in expected]
    assert {r["micro_batch"] for r in records} == {4}
    for r in records:  # √(B/B₀) rule
        assert r["lr"] == pytest.approx(3e-3 * (r["global_batch_sequences"] / 4) ** 0.5)


class _Recorder(BaseHook):
    def __init__(self) -> None:
        self.micro: list[MicroStepInfo] = []
        self.sums: list[dict[str, torch.Tensor]] = []
        self.final: dict[str, torch.Tensor] = {}

    def on_micro_step(self, model: torch.nn.Module, info: MicroStepInfo) -> None:
        self.micro.append(info)
        self.sums.append({n: p.grad * info.grad_to_sum_factor for n, p in model.named_parameters()})

    def on_gradients(self, model: torch.nn.Module, info: StepInfo) -> dict[str, float]:
        self.final = {n: p.grad.clone() for n, p in model.named_parameters()}
        return {"hook_global_targets": float(info.global_target_tokens)}


def test_hooks_see_the_documented_gradients(corpus_dir: Path, tmp_path: Path) -> None:
    hook = _Recorder()
    cfg = small_config(corpus_dir, tmp_path / "out", run={"steps": 1}, batch={"micro_batch_sequences": 2})
    run(cfg, hooks=[hook])
    assert [i.micro_index for i in hook.micro] == [0, 1, 2, 3]
    n_global = hook.micro[0].global_target_tokens
    assert sum(i.micro_target_tokens for i in hook.micro) == n_global
    # accumulated p.grad × grad_to_sum_factor is ∇Σℓ; the final (synced, unscaled) grad is ∇Σℓ / N
    for name, grad in hook.final.items():
        assert torch.allclose(hook.sums[-1][name] / n_global, grad, rtol=1e-5, atol=1e-8)
    record = read_metrics(tmp_path / "out" / "metrics.jsonl")[0]
    assert record["hook_global_targets"] == n_global == record["target_tokens"]


def test_resume_continues_exactly(corpus_dir: Path, tmp_path: Path) -> None:
    cfg = small_config(corpus_dir, tmp_path / "out", run={"steps": 6, "checkpoint_every": 3})
    run(cfg)
    full = [r["loss"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl")]
    # Rewind to the step-3 checkpoint, as if the run had died after step 5
    ckpts = tmp_path / "out" / "checkpoints"
    (ckpts / "latest").write_text("step-00000003")
    resumed = run(cfg.replace(run={"resume": True}))
    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and resumed["steps"] == 6
    assert [r["loss"] for r in records] == full


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("change", "message"), [
    ({"data": {"seq_len": 2048}}, "exceeds the model's 1024 positions"),
    ({"batch": {"global_batch_sequences": 10, "micro_batch_sequences": 4}}, "not divisible by micro 4"),
    ({"data": {"data": "/nonexistent/corpus"}}, "does not exist"),
    ({"batch": {"batch_schedule": "steps:0=6,100=8", "micro_batch_sequences": 4}}, "not a multiple of micro"),
])
def test_bad_input_fails_before_writing(corpus_dir: Path, tmp_path: Path, change: dict[str, Any], message: str) -> None:
    from batchpilot.errors import BatchpilotError

    out = tmp_path / "out"
    run(small_config(corpus_dir, out, run={"steps": 1}))
    before = _snapshot(out)
    bad = small_config(corpus_dir, out, run={"steps": 1})
    for section, values in change.items():
        bad = bad.replace(**{section: values})
    with pytest.raises(BatchpilotError, match=message):
        run(bad)
    assert _snapshot(out) == before


def test_empty_corpus_is_an_error(tmp_path: Path) -> None:
    from batchpilot.errors import DataError

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("")
    with pytest.raises(DataError, match="no non-empty documents"):
        run(small_config(tmp_path / "c", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_local_pretrained_checkpoint_directory(corpus_dir: Path, tmp_path: Path) -> None:
    model = build_model(ModelConfig(), seed=123).module
    model.save_pretrained(tmp_path / "ckpt", safe_serialization=True)
    cfg = small_config(corpus_dir, tmp_path / "out", model={"model": str(tmp_path / "ckpt")}, run={"steps": 1})
    trainer = Trainer(cfg, CPU)
    assert trainer.built.source == "pretrained"
    for (name, p), q in zip(trainer.model.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q), name  # the saved weights, not a fresh init


def test_tokenizer_larger_than_the_vocabulary_fails_up_front(corpus_dir: Path, tmp_path: Path) -> None:
    from batchpilot.errors import SpecError

    with pytest.raises(SpecError, match="--tokenizer bpe:8192 needs 8192 ids but the model's vocabulary is 512"):
        run(small_config(corpus_dir, tmp_path / "out").replace(data={"tokenizer": "bpe:8192"}))


def test_tokens_budget_ends_the_run_and_drives_the_lr(corpus_dir: Path, tmp_path: Path) -> None:
    cfg = small_config(corpus_dir, tmp_path / "out", run={"steps": None, "tokens": 600},
                       optim={"warmup_steps": 0, "decay": "linear", "min_lr_ratio": 0.0})
    summary = run(cfg)
    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert records[-1]["tokens"] >= 600 > records[-2]["tokens"] and summary["steps"] == len(records)
    before = [0] + [r["tokens"] for r in records[:-1]]
    for r, seen in zip(records, before, strict=True):  # linear decay over tokens: lr = peak × (1 − seen/600)
        assert r["lr"] == pytest.approx(3e-3 * (1 - seen / 600))
