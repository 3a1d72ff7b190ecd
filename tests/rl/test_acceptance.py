"""Published runs planned end to end (slow: DeepSeek-V3 on 512 GPUs plans in ~15 s): R1-Zero and DAPO where they
really ran, their verl exports through verl's own validate_config."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchpilot.rl.exports import export_text, parse_verl_overrides
from batchpilot.rl.plan import RLPlan, RLPlanRequest, plan_rl
from batchpilot.rl.recipes import recipe
from batchpilot.specs.hardware import load_accelerator
from batchpilot.specs.model import load_model

pytestmark = pytest.mark.slow


def _plan(name: str, gpu: str, gpus: int) -> RLPlan:
    r = recipe(name)
    return plan_rl(RLPlanRequest(model=load_model(r.model_preset), gpu=load_accelerator(gpu), gpus=gpus, batch=r.batch(),
                                 max_prompt_tokens=r.max_prompt_tokens, max_response_tokens=r.max_response_tokens,
                                 reference=r.reference))


def _verl_validates(plan: RLPlan) -> None:
    verl = pytest.importorskip("verl", reason="the optional extra `rl` installs verl's validator")
    from hydra import compose, initialize_config_dir
    from verl.utils.config import validate_config

    name, overrides = parse_verl_overrides(export_text(plan, "verl"))
    with initialize_config_dir(config_dir=str(Path(verl.__file__).parent / "trainer" / "config"), version_base=None):
        config = compose(config_name=name, overrides=overrides)
    validate_config(config, use_reference_policy=plan.request.reference, use_critic=False)


def test_deepseek_r1_zero_on_512_h800() -> None:
    # DeepSeek-R1 (Nature 2025) Methods: 8,192 outputs per rollout, 16 mini-batches of 512, one inner epoch; 64×8 H800.
    p = _plan("deepseek-r1-zero", "h800", 512)
    assert (p.batch.samples_per_rollout, p.batch.samples_per_update, p.batch.updates_per_rollout) == (8192, 512, 16)
    assert p.max_policy_lag == 15 and p.fits
    # 32K-token responses do not all fit in the engines' KV caches at once: the rollout runs in waves.
    assert p.rollout.result.waves > 1
    _verl_validates(p)


def test_dapo_on_128_h20() -> None:
    # DAPO (arXiv:2503.14476 §4.1; verl recipe at 4f80e465): 512 prompts × 16, mini-batch 512, 16×8 H20.
    p = _plan("dapo", "h20", 128)
    assert (p.batch.samples_per_rollout, p.batch.updates_per_rollout, p.max_policy_lag) == (8192, 16, 15)
    assert p.fits
    _verl_validates(p)
