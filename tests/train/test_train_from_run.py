"""``--model RUN_DIR``: ``batchpilot noise`` and ``batchpilot train`` start from a run folder's newest good
checkpoint (model weights only), built from the run's recorded model config, with the run's tokenizer.

Expected numbers are derived independently: the checkpoint's tensors are read here with ``torch.load`` and
written as a pretrained directory with ``save_pretrained`` (the existing ``from_pretrained`` path), so a
run from ``RUN_DIR`` must reproduce, on the same data, seed and batch, every loss of a run from that
directory; a copied optimizer state or a different weight would change them.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from train_helpers import small_config, write_corpus
from typer.testing import CliRunner

from batchpilot.cli import app
from batchpilot.errors import BatchpilotError
from batchpilot.train import run
from batchpilot.train.config import DataConfig, ModelConfig
from batchpilot.train.dcp_io import read_model_state, read_tensors
from batchpilot.train.model import build_model
from batchpilot.train.run_folder import RunFolder, base_model, check_run_tokenizer

RUNNER = CliRunner()
BASE_STEPS = 4


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 4-step tiny-llama-1m run (checkpoints at steps 2 and 4) and the step-4 weights as a pretrained dir."""
    root = tmp_path_factory.mktemp("from-run")
    corpus = write_corpus(root / "corpus")
    run_dir = root / "base"
    run(small_config(corpus, run_dir, run={"steps": BASE_STEPS, "checkpoint_every": 2}))
    tensors = read_model_state(run_dir / "checkpoints" / "step-00000004")
    module: Any = build_model(ModelConfig(), seed=0).module  # a transformers PreTrainedModel
    module.load_state_dict(tensors, strict=True)
    module.save_pretrained(root / "pretrained", safe_serialization=True)
    return {"root": root, "corpus": corpus, "run": run_dir, "pretrained": root / "pretrained"}


def _checkpoint_tensors(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return read_model_state(run_dir / "checkpoints" / f"step-{step:08d}")


def _noise(model: Path | str, corpus: Path, *extra: str) -> Any:
    args = ["noise", "--model", str(model), "--data", str(corpus), "--seq-len", "32", "--micro-batch", "2",
            "--global-batch", "4", "--steps", "2", "--threads", "1", "--json", *extra]
    return RUNNER.invoke(app, args)


def _train(model: Path | str, corpus: Path, out: Path) -> Any:
    args = ["train", "--model", str(model), "--data", str(corpus), "--seq-len", "32", "--global-batch", "4",
            "--micro-batch", "2", "--warmup-steps", "1", "--steps", "2", "--threads", "1", "--out", str(out), "--json"]
    return RUNNER.invoke(app, args)


def _one_line_exit_2(result: Any, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1, line
    for needle in needles:
        assert needle in line, line
    return line


def test_loaded_weights_are_the_newest_checkpoints_exactly(base: dict[str, Path]) -> None:
    expected = _checkpoint_tensors(base["run"], BASE_STEPS)
    built = build_model(ModelConfig(model=str(base["run"])), seed=123)  # the seed must not matter
    fresh = build_model(ModelConfig(), seed=123).module.state_dict()
    state = built.module.state_dict()
    assert built.source == f"run:{base['run']}@step-{BASE_STEPS:08d}"
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert not all(torch.equal(fresh[k], expected[k]) for k in expected)


def test_noise_from_a_run_folder_measures_at_its_checkpoint(base: dict[str, Path]) -> None:
    from_run = _noise(base["run"], base["corpus"])
    assert from_run.exit_code == 0, from_run.output
    record = json.loads(from_run.stdout)
    assert record["model_source"] == f"run:{base['run']}@step-{BASE_STEPS:08d}"
    reference = json.loads(_noise(base["pretrained"], base["corpus"]).stdout)  # the same weights, another loader
    assert reference["model_source"] == "pretrained"
    for ours, theirs in zip(record["trajectory"], reference["trajectory"], strict=True):
        assert math.isclose(ours["loss"], theirs["loss"], rel_tol=1e-6)
        assert math.isclose(ours["b_simple"], theirs["b_simple"], rel_tol=1e-4)
    fresh = json.loads(_noise("tiny-llama-1m", base["corpus"]).stdout)  # random init, same data and seed
    assert record["loss_first"] < fresh["loss_first"] - 0.1


def test_train_from_a_run_folder_is_a_new_run_not_a_resume(base: dict[str, Path]) -> None:
    """Another global batch (4, the base used 8) is fine; the per-step losses equal a run started from the
    same weights as a pretrained directory: same weights before step 1, and a fresh AdamW (a copied Adam
    state or step counter would change step 2)."""
    new, reference = base["root"] / "new", base["root"] / "new-from-pretrained"
    result = _train(base["run"], base["corpus"], new)
    assert result.exit_code == 0, result.output
    assert _train(base["pretrained"], base["corpus"], reference).exit_code == 0
    summary = json.loads((new / "summary.json").read_text())
    assert summary["model_source"] == f"run:{base['run']}@step-{BASE_STEPS:08d}" and summary["steps"] == 2
    ours = [json.loads(line)["loss"] for line in (new / "metrics.jsonl").read_text().splitlines()]
    theirs = [json.loads(line)["loss"] for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert len(ours) == 2 and all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(ours, theirs, strict=True))
    blob = torch.load(new / "checkpoints" / "step-00000002" / "train.pt", weights_only=True)
    assert blob["state"]["train"]["step"] == 2
    optimizer = read_tensors(new / "checkpoints" / "step-00000002", "optimizer")
    assert {float(v) for k, v in optimizer.items() if k.endswith(".step")} == {2.0}  # not 4 + 2
    # a run started from a run: its architecture is followed back to the base run's preset
    assert base_model(str(new)) == "tiny-llama-1m"
    chained = build_model(ModelConfig(model=str(new)), seed=0).module.state_dict()
    assert all(torch.equal(chained[k], v) for k, v in _checkpoint_tensors(new, 2).items())


def _flip_a_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def test_a_damaged_newest_checkpoint_falls_back_with_the_warning(base: dict[str, Path], tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    copy = tmp_path / "run"
    shutil.copytree(base["run"], copy)
    _flip_a_byte(copy / "checkpoints" / "step-00000004" / "dcp" / "__0_0.distcp")
    with caplog.at_level(logging.WARNING, logger="batchpilot.train"):
        built = build_model(ModelConfig(model=str(copy)), seed=0)
    assert built.source == f"run:{copy}@step-00000002"
    assert "step-00000004" in caplog.text and "SHA-256" in caplog.text and "loading weights from" in caplog.text
    state = built.module.state_dict()
    assert all(torch.equal(state[k], v) for k, v in _checkpoint_tensors(copy, 2).items())
    _flip_a_byte(copy / "checkpoints" / "step-00000002" / "dcp" / "__0_0.distcp")
    _one_line_exit_2(_noise(copy, base["corpus"]), "none of the 2 checkpoints", "is usable")


def test_a_run_folder_without_a_checkpoint_is_one_line(base: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "no-checkpoint"
    empty.mkdir()
    shutil.copy(base["run"] / "summary.json", empty / "summary.json")
    _one_line_exit_2(_noise(empty, base["corpus"]), "holds no checkpoint")


def test_a_run_whose_recorded_model_is_gone_is_one_line(base: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(base["run"], copy)
    summary = json.loads((copy / "summary.json").read_text())
    summary["config"]["model"]["model"] = str(tmp_path / "deleted" / "config.json")
    (copy / "summary.json").write_text(json.dumps(summary))
    _one_line_exit_2(_noise(copy, base["corpus"]), "no longer exists", "deleted/config.json")
    out = tmp_path / "new"
    _one_line_exit_2(_train(copy, base["corpus"], out), "no longer exists")
    assert not out.exists()


def test_another_tokenizer_is_one_line(base: dict[str, Path]) -> None:
    _one_line_exit_2(_noise(base["run"], base["corpus"], "--tokenizer", "bpe:300"),
                     "--tokenizer bytes", "different vocabulary")


def test_a_bpe_run_needs_its_own_data_for_its_tokenizer(tmp_path: Path) -> None:
    """A ``bpe:`` tokenizer is trained on the run's training split: other data is another vocabulary."""
    bpe_run = RunFolder(path=tmp_path, record="summary.json", model="tiny-llama-1m", tokenizer="bpe:300",
                        data="stdlib", text_field="text", val_fraction=0.02)
    check_run_tokenizer(bpe_run, DataConfig(data="stdlib", tokenizer="bpe:300"))
    with pytest.raises(BatchpilotError, match="different vocabulary; use --data stdlib"):
        check_run_tokenizer(bpe_run, DataConfig(data=str(tmp_path), tokenizer="bpe:300"))
    with pytest.raises(BatchpilotError, match="pass --tokenizer bpe:300"):
        check_run_tokenizer(bpe_run, DataConfig(data="stdlib", tokenizer="bytes"))
