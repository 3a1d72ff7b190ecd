"""The runner's outputs beside metrics.jsonl: the WSD schedule, the Hugging Face export, TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from train_helpers import small_config

from batchpilot.train.dcp_io import read_model_state
from batchpilot.train.lr import LRSchedule
from batchpilot.train.metrics import read_metrics
from batchpilot.train.runner import run


def test_wsd_is_flat_then_linear_over_the_last_decay_ratio() -> None:
    """Warmup 2, 10 steps, decay ratio 0.3, floor 0.1: flat at the peak until progress 0.7, then linear to
    0.1 × peak at the end (torchtitan's linear_warmup_stable_decay, decay_type linear)."""
    lr = LRSchedule(peak_lr=1.0, warmup_steps=2, decay="wsd", min_lr_ratio=0.1, scaling="none",
                    reference_batch_sequences=8, total_steps=10, decay_ratio=0.3)
    values = [lr.lr(step=s, tokens_seen=0, global_batch_sequences=8) for s in range(11)]
    assert values[:2] == [0.5, 1.0] and values[2:8] == [1.0] * 6
    for step, expected in ((8, 1 - 0.9 * (0.8 - 0.7) / 0.3), (9, 1 - 0.9 * (0.9 - 0.7) / 0.3), (10, 0.1)):
        assert math.isclose(values[step], expected, rel_tol=1e-12)


def test_export_hf_loads_with_from_pretrained_and_matches_the_checkpoint(corpus_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    run(small_config(corpus_dir, out, run={"steps": 2, "export_hf": True}))
    loaded = AutoModelForCausalLM.from_pretrained(str(out / "hf"), local_files_only=True)
    final = read_model_state(out / "checkpoints" / "step-00000002")
    state = loaded.state_dict()
    assert set(final) == set(state) and all(torch.equal(state[k], v) for k, v in final.items())
    assert json.loads((out / "hf" / "batchpilot.json").read_text()) == {"tokenizer": "bytes"}
    assert loaded.config.use_cache  # turned off for recomputation only, on again for inference


def test_export_hf_writes_a_bpe_tokenizer_that_transformers_loads(corpus_dir: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer

    monkeypatch.setenv("BATCHPILOT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    run(small_config(corpus_dir, out, run={"steps": 1, "export_hf": True}).replace(data={"tokenizer": "bpe:300"}))
    tokenizer = AutoTokenizer.from_pretrained(str(out / "hf"), local_files_only=True)
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.decode(tokenizer("def x").input_ids) == "def x"


def test_tensorboard_sink_holds_every_step_of_metrics_jsonl(corpus_dir: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    run(small_config(corpus_dir, out, run={"steps": 3, "log_sinks": ("tensorboard",)}))
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("loss")]
    expected = [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl")]
    assert [s for s, _ in losses] == [s for s, _ in expected] == [1, 2, 3]
    assert all(math.isclose(a, b, rel_tol=1e-6) for (_, a), (_, b) in zip(losses, expected, strict=True))
