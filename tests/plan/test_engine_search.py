"""``plan --engine E`` proposes only what E runs, and its exports are what E needs: the cases a user pasting a plan
into DeepSpeed, the HF Trainer or batchpilot's own runner met before engines declared what they run."""

from __future__ import annotations

import json

import engine_checks as checks
import pytest

from batchpilot.cli import app
from batchpilot.errors import SpecError
from batchpilot.plan.engines import ENGINES, get_engine, plan_problems
from batchpilot.plan.exports import ExportError, export, export_text
from batchpilot.plan.planner import Pins, PlanRequest, plan
from batchpilot.specs.hardware import ClusterSpec, load_accelerator
from batchpilot.specs.model import load_model

CLUSTER_16 = ClusterSpec(accelerator=load_accelerator("h100-sxm"), devices_per_node=8, num_nodes=2,
                         inter_node_bandwidth_bytes_per_s=50e9)


def llama_8b_4mi(engine: str | None, **pins) -> PlanRequest:
    """Llama 3 8B on 16 H100, seq 8192, 4Mi tokens per step."""
    return PlanRequest(model=load_model("llama-3-8b"), cluster=CLUSTER_16, seq_len=8192,
                       global_batch_tokens=4 * 2**20, engine=engine, pins=Pins(**pins))


def test_deepspeed_plans_are_configs_deepspeed_accepts_on_16_ranks():
    """The DeepSpeed plan is never interleaved (DeepSpeed has no such schedule), and its config passes DeepSpeed's own
    batch check on 16 ranks with the pipeline's grid (it used to fail: 512 != 1 * 128 * 16) and reads back equal."""
    pytest.importorskip("deepspeed")
    req = llama_8b_4mi("deepspeed")
    result = plan(req)
    assert all(p.settings.vpp == 1 and p.settings.tp == 1 for p in result.plans)
    for best in result.plans:
        text = export_text(best, req, "deepspeed")
        assert ("pipeline" in json.loads(text)) == (best.settings.pp > 1)
        assert checks.check_deepspeed(text, best) == checks.expected(best, req, seq_len=False)


def test_deepspeed_pipeline_carries_its_recomputation():
    pytest.importorskip("deepspeed")
    req = llama_8b_4mi("deepspeed", pp=4, recompute="full")
    best = plan(req).plans[0]
    exported = export(best, req, "deepspeed")
    config = json.loads(exported.text)
    assert config["pipeline"] == {"stages": 4, "activation_checkpoint_interval": 1}
    assert checks.check_deepspeed(exported.text, best).recompute == "full"
    assert any("PipelineModule(layers, num_stages=4)" in n for n in exported.notes)


def test_deepspeed_refuses_what_it_cannot_run():
    with pytest.raises(SpecError, match=r"--engine deepspeed has no interleaved pipeline schedule .*megatron"):
        plan(llama_8b_4mi("deepspeed", pp=4, vpp=2))
    with pytest.raises(SpecError, match="--engine deepspeed cannot run --tp 2"):
        plan(llama_8b_4mi("deepspeed", tp=2))
    interleaved = plan(llama_8b_4mi("megatron", pp=4, vpp=2)).plans[0]
    with pytest.raises(ExportError, match=r"^--export deepspeed: deepspeed has no interleaved pipeline schedule"):
        export_text(interleaved, llama_8b_4mi("megatron"), "deepspeed")


def test_the_default_engine_plans_what_its_exports_run():
    """The default engine (the HF Trainer) proposes no tensor or pipeline parallelism, and every plan exports as
    TrainingArguments; batchpilot's runner plans launch `batchpilot train`, never Megatron-LM."""
    req = PlanRequest(model=load_model("llama-3-8b"), cluster=CLUSTER_16, seq_len=4096, global_batch_sequences=256,
                      engine="hf", top=5)
    for best in plan(req).plans:
        assert (best.settings.tp, best.settings.pp, best.settings.cp) == (1, 1, 1)
        assert json.loads(export_text(best, req, "hf"))["per_device_train_batch_size"] == best.triad.micro_batch_sequences
    small = PlanRequest(model=load_model("qwen2.5-0.5b"), cluster=CLUSTER_16, seq_len=2048, global_batch_sequences=256,
                        engine="batchpilot", top=5)
    for best in plan(small).plans:
        line = export_text(best, small, "torchrun")
        assert "-m batchpilot.cli train" in line and "pretrain_gpt.py" not in line


def test_cli_default_engine_is_the_hf_trainer(cli_runner):
    result = cli_runner.invoke(app, ["plan", "--model", "llama-3-8b", "--gpu", "h100-sxm", "--gpus", "16",
                                     "--seq-len", "4096", "--global-batch", "256", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert all((p["tp"], p["pp"]) == (1, 1) for p in record["plans"])
    legacy = cli_runner.invoke(app, ["plan", "--model", "llama-3-8b", "--gpu", "h100-sxm", "--gpus", "16",
                                     "--seq-len", "4096", "--global-batch", "256", "--engine", "fsdp2", "--json"])
    assert legacy.exit_code == 0 and "--engine fsdp2 named the memory bookkeeping" in legacy.stderr


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_every_plan_is_one_its_engine_runs(engine):
    """The search and the table agree: no plan the search returns has a problem for its own engine."""
    caps = get_engine(engine)
    model = "qwen2.5-0.5b" if engine == "batchpilot" else "llama-3-8b"
    req = PlanRequest(model=load_model(model), cluster=CLUSTER_16, seq_len=4096, global_batch_sequences=512,
                      engine=engine, top=5)
    for best in plan(req).plans:
        assert plan_problems(caps, best.settings, dp=best.triad.data_parallel_ranks,
                             accum=best.triad.grad_accum_steps, seq_len=req.seq_len) == []


def test_torchtitan_interleaving_follows_torch_not_megatron():
    """torch's Interleaved1F1B runs n microbatches when n % max(1, n // pp) == 0 (schedules.py:2935-2942): 6 on pp 4
    is fine there, but Megatron-LM's interleaved schedule needs a multiple of pp (schedules.py:1160-1180)."""
    from batchpilot.plan.engines import pipeline_problem

    assert pipeline_problem(get_engine("torchtitan"), pp=4, vpp=2, accum=6) is None
    assert "multiple of 4" in (pipeline_problem(get_engine("megatron"), pp=4, vpp=2, accum=6) or "")
    assert "at least pp 4" in (pipeline_problem(get_engine("torchtitan"), pp=4, vpp=1, accum=3) or "")
    assert "no interleaved" in (pipeline_problem(get_engine("deepspeed"), pp=4, vpp=2, accum=8) or "")
