"""Every plan ``plan --engine E`` returns exports in E's formats, passes E's own validation at the plan's world size
and reads back equal to the plan (:mod:`engine_checks`), for random presets, clusters and targets (hypothesis).

The default run draws a few examples per engine; ``-m slow`` draws many more."""

from __future__ import annotations

import dataclasses
import json

import engine_checks as checks
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchpilot.errors import BatchpilotError
from batchpilot.plan.engines import ENGINE_NAMES, get_engine
from batchpilot.plan.exports import ExportOptions, export
from batchpilot.plan.planner import PlanRequest, plan
from batchpilot.plan.request import Plan
from batchpilot.specs.hardware import ClusterSpec, load_accelerator
from batchpilot.specs.model import load_model
from batchpilot.specs.settings import RunSettings

pytest.importorskip("deepspeed")
pytest.importorskip("accelerate")
pytest.importorskip("lightning")

MODELS = ("tiny-llama-15m", "gpt2", "qwen2.5-0.5b", "qwen2.5-1.5b", "llama-3-8b", "mixtral-8x7b")
DATA = "corpus.jsonl"


@st.composite
def requests(draw: st.DrawFn, engine: str) -> PlanRequest:
    caps = get_engine(engine)
    model = load_model(draw(st.sampled_from(MODELS)))
    big = model.params_total > 3e9
    gpus = draw(st.sampled_from((8, 16, 32, 64) if big else (1, 2, 4, 8, 16)))
    seq_len = draw(st.sampled_from((1024, 2048, 4096)))
    precision = draw(st.sampled_from(caps.precisions))
    fp8 = draw(st.sampled_from(caps.fp8_recipes)) if precision == "fp8" and caps.fp8_recipes else None
    optimizer = draw(st.sampled_from(sorted({o for s in caps.shardings for o in s.optimizers})))
    offload = draw(st.booleans()) if any(s.offload and optimizer in s.optimizers for s in caps.shardings) else False
    every = draw(st.sampled_from((1, 2))) if caps.every_n else 1
    base = RunSettings(precision=precision, fp8_recipe=fp8, optimizer=optimizer, offload=offload,  # type: ignore[arg-type]
                       engine="deepspeed" if offload else "torch", zero_stage=1 if offload else 0,
                       recompute="full" if every > 1 else "none", recompute_every=every)
    cluster = ClusterSpec(accelerator=load_accelerator("h100-sxm"), devices_per_node=min(8, gpus),
                          num_nodes=max(1, gpus // 8), inter_node_bandwidth_bytes_per_s=50e9 if gpus > 8 else None)
    deviation = draw(st.sampled_from((0.0, 0.05, 0.2)))
    if draw(st.booleans()):
        target = {"global_batch_sequences": draw(st.integers(1, 64)) * gpus + draw(st.sampled_from((0, 0, 3)))}
    else:
        target = {"global_batch_tokens": draw(st.sampled_from((2**19, 2**20, 4 * 2**20, 3_000_000)))}
        deviation = max(deviation, 0.05)
    return PlanRequest(model=model, cluster=cluster, seq_len=seq_len, settings=base, engine=engine, top=3,
                       max_deviation=deviation, **target)


def _plans(req: PlanRequest) -> tuple[Plan, ...]:
    try:
        return plan(req).plans
    except BatchpilotError:  # nothing fits / no batch: nothing to export (the planner's own tests cover those)
        return ()


def check_all_exports(req: PlanRequest, best: Plan) -> None:
    """Every format of the engine: exported, validated by the engine's own code, read back equal to the plan."""
    caps = get_engine(req.engine or "")
    options = ExportOptions(data=DATA)
    for fmt in caps.exports:
        if fmt == "hf-deepspeed" and best.settings.engine != "deepspeed":
            continue
        text = export(best, req, fmt, options).text
        got = _read_back(fmt, text, best, req)
        want = checks.expected(best, req, seq_len=got.seq_len is not None)
        if fmt == "megatron" or (fmt == "torchrun" and best.settings.engine == "megatron"):
            want = _megatron_recompute(want, best, req)
        if fmt == "deepspeed" and best.settings.pp == 1:
            want = dataclasses.replace(want, pp=1)
        if fmt in ("hf", "accelerate", "lightning", "hf-deepspeed") or (fmt == "torchrun" and best.settings.engine != "megatron"):
            got = dataclasses.replace(got, tp=want.tp, pp=want.pp, vpp=want.vpp, cp=want.cp)  # none of these have them
        assert got == want, f"{fmt}: read back {got} != plan {want}"


def _read_back(fmt: str, text: str, best: Plan, req: PlanRequest) -> checks.ReadBack:
    if fmt == "deepspeed":
        return checks.check_deepspeed(text, best)
    if fmt == "hf":
        return checks.check_hf(text, best, req)
    if fmt == "hf-deepspeed":
        hf_kwargs = json.loads(export(best, req, "hf").text)
        return checks.check_hf(json.dumps({**hf_kwargs, "deepspeed": json.loads(text)}), best, req)
    if fmt == "accelerate":
        return checks.check_accelerate(text, best)
    if fmt == "lightning":
        return checks.check_lightning(text, best)
    if fmt == "torchtitan":
        return checks.check_torchtitan(text, best, req)
    if fmt == "megatron":
        _env, argv = checks.shell_argv(text)
        return checks.check_megatron(argv, best, env={"CUDA_DEVICE_MAX_CONNECTIONS": "1"})
    assert fmt == "torchrun"
    return _check_torchrun(text, best, req)


def _check_torchrun(text: str, best: Plan, req: PlanRequest) -> checks.ReadBack:
    """torch's own ``torchrun`` parser, then the started program's: Megatron-LM's rules, or batchpilot's ``train``
    command parsed by its own click context (parsed, not run)."""
    import typer
    from torch.distributed.run import get_args_parser

    from batchpilot.cli import app

    env, argv = checks.shell_argv(text)
    parsed = get_args_parser().parse_args(argv[1:])
    world = int(parsed.nnodes) * int(parsed.nproc_per_node)
    if parsed.training_script == "pretrain_gpt.py":
        return checks.check_megatron(list(parsed.training_script_args), best, env=env)
    train = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    params = train.make_context("train", list(parsed.training_script_args[1:])).params
    assert params["expect_world_size"] == world and params["data"] == DATA
    micro, global_batch, tp = params["micro_batch"], params["global_batch"], params["tp"]
    dp = world // tp  # the runner's data-parallel ranks (train/parallelize.py ParallelLayout)
    assert global_batch % (micro * dp) == 0  # the runner's own check (train/config.py)
    return checks.ReadBack(world=world, micro=micro, accum=global_batch // (micro * dp), dp=dp,
                           global_batch=global_batch, zero=params["zero"] or (3 if params["fsdp"] else 0),
                           offload=False, precision=params["precision"], tp=tp, seq_len=params["seq_len"],
                           recompute=params["recompute"] + (f"/{params['recompute_every']}"
                                                            if params["recompute_every"] > 1 else ""))


def _megatron_recompute(want: checks.ReadBack, best: Plan, req: PlanRequest) -> checks.ReadBack:
    s = best.settings
    if s.recompute != "full" or s.recompute_every == 1:
        return want
    per_stage = -(-req.model.num_layers // (s.pp * s.vpp))
    return dataclasses.replace(want, recompute=f"full/block {max(1, per_stage // s.recompute_every)}")


def _run(engine: str, data: st.DataObject) -> None:
    req = data.draw(requests(engine))
    for best in _plans(req):
        check_all_exports(req, best)


_QUICK = settings(max_examples=2, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_MANY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("engine", ENGINE_NAMES)
@_QUICK
@given(data=st.data())
def test_every_plan_exports_and_passes_its_engine(engine: str, data: st.DataObject) -> None:
    _run(engine, data)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINE_NAMES)
@_MANY
@given(data=st.data())
def test_every_plan_exports_and_passes_its_engine_many(engine: str, data: st.DataObject) -> None:
    _run(engine, data)
