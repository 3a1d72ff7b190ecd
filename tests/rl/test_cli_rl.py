"""``batchpilot rl plan``: the JSON contract, one-line refusals, exports written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchpilot.cli import app

SMALL = ["rl", "plan", "--model", "qwen2.5-0.5b", "--gpu", "h100-sxm", "--gpus", "8", "--prompts-per-rollout", "32",
         "--group-size", "8", "--updates-per-rollout", "4", "--max-prompt-len", "512", "--max-response-len", "2048"]


def test_json_contract(cli_runner) -> None:
    result = cli_runner.invoke(app, [*SMALL, "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    for key in ("samples_per_rollout", "samples_per_update", "updates_per_rollout", "max_policy_lag", "memory",
                "step_time_s", "fits"):
        assert key in record
    assert (record["samples_per_rollout"], record["samples_per_update"], record["updates_per_rollout"]) == (256, 64, 4)
    assert record["max_policy_lag"] == 3 and record["fits"] is True
    assert {"rollout", "actor_update", "old_log_prob", "reference"} <= set(record["memory"])
    assert record["step_time_s"]["step"] == pytest.approx(
        sum(v for k, v in record["step_time_s"].items() if k != "step"))


def test_like_r1_zero_on_480_gpus_is_one_line_with_choices(cli_runner) -> None:
    result = cli_runner.invoke(app, ["rl", "plan", "--like", "deepseek-r1-zero", "--gpu", "h800", "--gpus", "480"])
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "samples per rollout 8192" in lines[0] and "480 GPUs" in lines[0] and "--gpus 256 or 512" in lines[0]


def test_ppo_adds_the_critic(cli_runner) -> None:
    result = cli_runner.invoke(app, [*SMALL, "--algorithm", "ppo", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert {"critic_update", "critic_values"} <= set(record["memory"]) and "critic_update" in record["step_time_s"]


@pytest.mark.parametrize("fmt", ["verl", "trl", "openrlhf"])
def test_export_writes_the_file(cli_runner, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"plan.{fmt}"
    result = cli_runner.invoke(app, [*SMALL, "--framework", fmt, "--export", fmt, "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert {"verl": "data.train_batch_size=32", "trl": '"num_generations": 8',
            "openrlhf": "--rollout.batch_size 32"}[fmt] in text


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--export", "verl"], "--export and --out go together"),
    (["--group-size", "0"], "--group-size"),
    (["--algorithm", "dpo"], "--algorithm 'dpo'"),
    (["--updates-per-rollout", "3"], "divisor of the 32 prompts"),
])
def test_bad_input_is_one_line(cli_runner, extra: list[str], fragment: str) -> None:
    args = [a for a in SMALL]
    if "--group-size" in extra:
        args[args.index("--group-size") + 1] = extra[1]
    elif "--updates-per-rollout" in extra:
        args[args.index("--updates-per-rollout") + 1] = extra[1]
    else:
        args += extra
    result = cli_runner.invoke(app, args)
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and fragment in result.stderr


def test_missing_batch_needs_like(cli_runner) -> None:
    result = cli_runner.invoke(app, ["rl", "plan", "--model", "qwen2.5-0.5b", "--gpu", "h100-sxm", "--gpus", "8"])
    assert result.exit_code == 2 and "--like NAME" in result.stderr


def test_separate_rollout_gpus_add_one_rollout_of_lag(cli_runner) -> None:
    result = cli_runner.invoke(app, [*SMALL, "--placement", "separate", "--rollout-gpus", "4", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    # One step off-policy: the samples of a rollout are generated while the previous rollout's 4 updates train.
    assert record["max_policy_lag"] == 3 + 4 and record["train"]["gpus"] == 4 and record["rollout"]["gpus"] == 4
    t = record["step_time_s"]
    assert t["step"] == pytest.approx(max(t["rollout"], sum(v for k, v in t.items()
                                                              if k not in ("rollout", "weight_sync", "step")))
                                      + t["weight_sync"])
