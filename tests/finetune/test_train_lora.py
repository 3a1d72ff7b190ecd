"""batchpilot train --finetune: LoRA through PEFT on CPU trains the adapters only (the base weights stay the seed's),
and a sharded layout is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("peft")

from batchpilot.cli import app
from batchpilot.measure.finetune import apply_finetune
from batchpilot.measure.step import build_module
from batchpilot.specs.finetune import parse_finetune
from batchpilot.specs.model import load_model
from batchpilot.train.checkpoint import load_model_weights


@pytest.mark.slow
def test_lora_trains_adapters_only_on_cpu(cli_runner, tmp_path) -> None:
    out = tmp_path / "run"
    result = cli_runner.invoke(app, ["train", "--model", "tiny-llama-1m", "--finetune", "lora,r=4", "--steps", "3",
                                     "--global-batch", "2", "--seq-len", "32", "--no-noise", "--device", "cpu",
                                     "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["final_loss"] == summary["final_loss"]  # finite, not NaN
    state = torch.load(next(out.glob("checkpoints/step-*/train.pt")), weights_only=False)
    assert state  # the trainer's own state was written
    reference = build_module(load_model("tiny-llama-1m").hf_config)  # the seed's weights
    trained = apply_finetune(build_module(load_model("tiny-llama-1m").hf_config), parse_finetune("lora,r=4"),
                             precision="fp32", param_dtype="fp32")
    load_model_weights(out, trained, warn=False)
    base = dict(reference.named_parameters())
    adapters_moved = False
    for name, p in trained.named_parameters():
        if "lora_" in name:
            adapters_moved |= "lora_B" in name and bool(p.abs().sum() > 0)  # B starts at zero
            continue
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(p, base[key]), name
    assert adapters_moved


def test_lora_refuses_a_sharded_layout() -> None:
    from batchpilot.errors import SpecError
    from batchpilot.train.finetune import check_layout

    with pytest.raises(SpecError, match="one process or under DDP"):
        check_layout("lora", sharded=True)
    check_layout("full", sharded=True)
