"""Exports load in their own libraries: DeepSpeed's config class checks the batch triad, transformers'
TrainingArguments and Lightning's Trainer accept the arguments, torchrun's own parser reads the command."""

from __future__ import annotations

import json

import pytest

from batchpilot.plan.exports import FORMATS, ExportError, export_text
from batchpilot.plan.exports.megatron import megatron_args
from batchpilot.plan.exports.torchrun import torchrun_command
from batchpilot.plan.planner import Pins, PlanRequest, plan
from batchpilot.specs.hardware import ClusterSpec, load_accelerator
from batchpilot.specs.model import load_model
from batchpilot.specs.settings import RunSettings

CLUSTER = ClusterSpec(accelerator=load_accelerator("h100-sxm"), devices_per_node=8, num_nodes=2,
                      inter_node_bandwidth_bytes_per_s=50e9)


def chosen(engine: str = "deepspeed", precision: str = "bf16", offload: bool = False, **pins):
    request = PlanRequest(model=load_model("tiny-llama-15m"), cluster=CLUSTER, seq_len=1024,
                          global_batch_sequences=96,
                          settings=RunSettings(engine=engine, precision=precision, offload=offload,
                                               zero_stage=1 if offload else 0),
                          pins=Pins(**pins))
    return plan(request).plans[0], request


@pytest.mark.parametrize(("zero", "micro"), [(0, 1), (1, 2), (2, 3), (3, 6)])
def test_deepspeed_config_passes_deepspeeds_batch_assertion(monkeypatch, zero, micro):
    deepspeed = pytest.importorskip("deepspeed")
    from deepspeed.runtime import config as ds_config

    best, request = chosen(zero_stage=zero, micro_batch=micro, tp=1, pp=1)
    config = json.loads(export_text(best, request, "deepspeed"))

    class DataParallel:  # what Megatron/DeepSpeed's mpu reports: the data-parallel world size
        def get_data_parallel_world_size(self) -> int:
            return best.triad.data_parallel_ranks

    monkeypatch.setattr(ds_config.dist, "get_rank", lambda: 0)
    parsed = ds_config.DeepSpeedConfig(config, mpu=DataParallel())
    assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) == (
        96, micro, 96 // (micro * 16))
    assert parsed.zero_optimization_stage == zero and parsed.bfloat16_config.enabled
    config["gradient_accumulation_steps"] += 1  # the same class rejects a triad that does not multiply out
    with pytest.raises(AssertionError, match="train_batch_size is not equal"):
        ds_config.DeepSpeedConfig(config, mpu=DataParallel())
    assert deepspeed.__version__


@pytest.mark.parametrize(("engine", "zero", "recompute"), [("deepspeed", 0, "none"), ("deepspeed", 2, "full"),
                                                           ("fsdp2", 3, "selective")])
def test_hf_training_arguments_load(engine, zero, recompute):
    transformers = pytest.importorskip("transformers")
    best, request = chosen(engine=engine, zero_stage=zero, recompute=recompute, micro_batch=2, tp=1, pp=1)
    kwargs = json.loads(export_text(best, request, "hf"))
    args = transformers.TrainingArguments(**kwargs, use_cpu=True)  # use_cpu: this test machine has no GPU
    assert args.per_device_train_batch_size == 2
    assert args.gradient_accumulation_steps == 96 // (2 * 16)
    assert args.bf16
    if engine == "fsdp2":
        assert args.fsdp_config["activation_checkpointing"] is True
    else:
        checkpointing = getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing
        assert bool(checkpointing) == (recompute != "none")
    if zero == 2:
        assert args.hf_deepspeed_config.config["train_batch_size"] == 96
        assert args.hf_deepspeed_config.config["zero_optimization"]["stage"] == 2
    if engine == "fsdp2":
        assert args.fsdp_config["reshard_after_forward"] is True


@pytest.mark.parametrize(("engine", "zero", "offload"), [("deepspeed", 0, False), ("deepspeed", 2, True),
                                                         ("deepspeed", 3, False), ("fsdp2", 2, False)])
def test_lightning_trainer_accepts_the_arguments(engine, zero, offload):
    lightning = pytest.importorskip("lightning")
    best, request = chosen(engine=engine, zero_stage=zero, offload=offload, tp=1, pp=1)
    exported = json.loads(export_text(best, request, "lightning"))
    kwargs = exported["trainer"]
    assert kwargs["devices"] * kwargs["num_nodes"] == best.triad.data_parallel_ranks == 16
    if kwargs["strategy"].startswith("fsdp"):  # FSDP refuses a CPU accelerator: build the strategy itself
        from lightning.pytorch.strategies import FSDPStrategy, StrategyRegistry

        assert kwargs["strategy"] in StrategyRegistry.available_strategies()
        strategy = FSDPStrategy(**exported["strategy_kwargs"])
        assert strategy.sharding_strategy.name == "SHARD_GRAD_OP"
        return
    trainer = lightning.Trainer(**{**kwargs, "accelerator": "cpu"}, logger=False, enable_checkpointing=False)
    assert trainer.world_size == 16 and trainer.accumulate_grad_batches == best.triad.grad_accum_steps
    assert type(trainer.strategy).__name__ == ("DDPStrategy" if zero == 0 else "DeepSpeedStrategy")
    assert exported["dataloader"]["batch_size"] == best.triad.micro_batch_sequences


def test_torchrun_command_parses_with_torchruns_parser_and_the_runners_cli():
    import typer
    from torch.distributed.run import get_args_parser

    from batchpilot.cli import app

    best, request = chosen(engine="fsdp2", zero_stage=3, tp=1, pp=1, micro_batch=2)
    argv = torchrun_command(best, request)
    parsed = get_args_parser().parse_args(argv[1:])
    assert int(parsed.nnodes) * int(parsed.nproc_per_node) == 16
    assert parsed.module and parsed.training_script == "batchpilot.cli" and parsed.training_script_args[0] == "train"
    train = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    params = train.make_context("train", list(parsed.training_script_args[1:])).params  # parses, does not run
    assert params["global_batch"] == 96 and params["micro_batch"] == 2 and params["fsdp"]
    assert params["expect_world_size"] == 16 and params["model"] == "tiny-llama-15m" and params["precision"] == "bf16"
    assert params["global_batch"] // (params["micro_batch"] * params["expect_world_size"]) == best.triad.grad_accum_steps
    assert export_text(best, request, "torchrun").startswith("torchrun --nnodes 2 --nproc-per-node 8")


def test_torchrun_launches_megatron_for_model_parallel_plans():
    from torch.distributed.run import get_args_parser

    best, request = chosen(tp=2, pp=2)
    parsed = get_args_parser().parse_args(torchrun_command(best, request)[1:])
    assert parsed.training_script == "pretrain_gpt.py"
    assert parsed.training_script_args == megatron_args(best, request)


def test_megatron_arguments_multiply_out():
    best, request = chosen(tp=2, pp=2, recompute="full", micro_batch=2)
    args = megatron_args(best, request)
    value = {k: args[i + 1] for i, k in enumerate(args) if k.startswith("--") and i + 1 < len(args)
             and not args[i + 1].startswith("--")}
    tp, pp = int(value["--tensor-model-parallel-size"]), int(value["--pipeline-model-parallel-size"])
    micro, global_batch = int(value["--micro-batch-size"]), int(value["--global-batch-size"])
    dp = 16 // (tp * pp)  # Megatron: data-parallel size = world / (tp × pp); accumulation = global / (micro × dp)
    assert (tp, pp, micro, global_batch) == (2, 2, 2, 96) and global_batch % (micro * dp) == 0
    assert global_batch // (micro * dp) == best.triad.grad_accum_steps
    assert value["--recompute-granularity"] == "full" and "--bf16" in args


@pytest.mark.parametrize("fmt", ["hf", "lightning"])
def test_model_parallel_plans_are_refused_where_inexpressible(fmt):
    best, request = chosen(tp=2)
    with pytest.raises(ExportError, match="--tp 1 --pp 1"):
        export_text(best, request, fmt)


def test_unknown_format_lists_the_known_ones():
    best, request = chosen()
    with pytest.raises(ExportError, match=", ".join(FORMATS)):
        export_text(best, request, "yaml")
