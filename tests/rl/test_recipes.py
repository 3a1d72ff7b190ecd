"""Published RL recipes: their hierarchy, R1 and R1-Zero kept apart, `known` showing them."""

from __future__ import annotations

import json

import pytest

from batchpilot.cli import app
from batchpilot.plan.registry import lookup
from batchpilot.rl.recipes import recipe, recipes


def test_r1_and_r1_zero_are_separate_entries() -> None:
    zero, stage1, stage2 = recipe("deepseek-r1-zero"), recipe("deepseek-r1"), recipe("deepseek-r1-stage2")
    assert len({zero.name, stage1.name, stage2.name}) == 3
    assert "65,536 tokens afterward" in zero.entry.source.quote and "65,536" not in stage1.entry.source.quote
    assert "temperature of 0.7" in stage2.entry.source.quote and "1,700" in stage2.entry.source.quote
    assert lookup("r1").name == "deepseek-r1" and lookup("r1-zero").name == "deepseek-r1-zero"


@pytest.mark.parametrize(("name", "rollout", "update", "updates"), [
    ("deepseek-r1-zero", 8192, 512, 16),   # Nature 2025: 8,192 outputs, 16 mini-batches of 512
    ("deepseekmath-grpo", 1024, 1024, 1),  # 64 outputs per question, batch 1024, a single update
    ("dapo", 8192, 512, 16),               # 512 prompts × 16, mini-batch 512: 16 updates
    ("deepscaler", 2048, 1024, 2),         # train_batch_size 128, n 16, ppo_mini_batch_size 64 (prompts)
    ("skywork-or1-32b", 4096, 4096, 1),    # 256 × 16, mini-batch 256 prompts
    ("simplerl-zoo-32b", 8192, 2048, 4),   # 1024 × 8, mini-batch 256 prompts
    ("nemo-rl-grpo-math-1b", 512, 512, 1), # 32 × 16, train_global_batch_size 512
])
def test_hierarchies_as_published(name: str, rollout: int, update: int, updates: int) -> None:
    b = recipe(name).batch()
    assert (b.samples_per_rollout, b.samples_per_update, b.updates_per_rollout) == (rollout, update, updates)


def test_every_recipe_names_a_preset_and_a_source() -> None:
    from batchpilot.specs.model import load_model

    for r in recipes().values():
        load_model(r.model_preset)
        assert r.entry.source.url.startswith("https://") and r.entry.source.quote


def test_known_shows_the_rl_batch(cli_runner) -> None:
    result = cli_runner.invoke(app, ["known", "deepseek-r1-zero"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "RL batch" in result.stdout and "8,192 samples per rollout" in result.stdout
    record = json.loads(cli_runner.invoke(app, ["known", "dapo", "--json"]).stdout)
    assert record["rl"]["dapo"]["updates_per_rollout"] == 16
