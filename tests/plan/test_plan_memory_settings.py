"""``plan`` with the memory settings (--compile, --fp8-recipe, --reshard-after-forward, --loss, ...), and on a
published run: torchtitan's Llama 3.1 8B on 8 H100 96 GB (benchmarks/llama3_h100_202412_torchtitan.md, Table 1:
FSDP over 8 GPUs, local batch 2, seq 8192, per-op selective checkpointing) must be among the plans that fit and
rank in the top five."""

from __future__ import annotations

import json
from typing import Any

from batchpilot.cli import app
from batchpilot.plan.options import PlanOptions, prepare_plan
from batchpilot.plan.planner import Pins, plan

TORCHTITAN_8B = ["plan", "--model", "llama-3.1-8b", "--gpu", "h100-96gb-hbm2e", "--gpus", "8", "--seq-len", "8192",
                 "--global-batch", "16", "--engine", "fsdp2", "--reshard-after-forward", "last", "--loss", "eager"]


def test_published_torchtitan_layout_ranks_in_the_top_five() -> None:
    # the published run is FSDP alone (tp 1); torchtitan runs sequence parallelism with any tp > 1, which the
    # step-time model ranks first here
    options = PlanOptions(model="llama-3.1-8b", gpu="h100-96gb-hbm2e", gpus=8, seq_len=8192, global_batch=16,
                          engine="fsdp2", reshard_after_forward="last", loss="eager", top=5, pins=Pins(tp=1))
    result = plan(prepare_plan(options).request)
    layouts = [(p.triad.micro_batch_sequences, p.triad.data_parallel_ranks, p.settings.tp, p.settings.pp,
                p.settings.zero_stage, p.settings.recompute) for p in result.plans[:5]]
    assert (2, 8, 1, 1, 3, "op") in layouts, layouts


def test_memory_settings_flags_reach_the_plan(cli_runner: Any) -> None:
    result = cli_runner.invoke(app, [*TORCHTITAN_8B, "--compile", "--top", "1", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    settings = record["plans"][0]["settings"]
    assert settings["compile"] is True and settings["reshard_after_forward"] == "last" and settings["loss"] == "eager"
