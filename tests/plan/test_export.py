"""Exports load in their own libraries at the plan's world size (DeepSpeed's config class checks the batch triad,
transformers' TrainingArguments fills its DeepSpeed "auto" values, accelerate builds its plugins, Lightning's Trainer
takes the arguments, torchrun's own parser reads the command) and refuse, in one line, what their engine does
not run."""

from __future__ import annotations

import json

import engine_checks as checks
import pytest

from batchpilot.errors import SpecError
from batchpilot.plan.exports import FORMATS, SUFFIXES, ExportError, ExportOptions, export, export_text
from batchpilot.plan.exports.megatron import megatron_args
from batchpilot.plan.exports.torchrun import torchrun_command
from batchpilot.plan.planner import Pins, PlanRequest, plan
from batchpilot.specs.hardware import ClusterSpec, load_accelerator
from batchpilot.specs.model import load_model
from batchpilot.specs.settings import RunSettings

CLUSTER = ClusterSpec(accelerator=load_accelerator("h100-sxm"), devices_per_node=8, num_nodes=2,
                      inter_node_bandwidth_bytes_per_s=50e9)


def chosen(engine: str = "deepspeed", precision: str = "bf16", offload: bool = False, model: str = "tiny-llama-15m",
           **pins):
    request = PlanRequest(model=load_model(model), cluster=CLUSTER, seq_len=1024, global_batch_sequences=96,
                          settings=RunSettings(precision=precision, offload=offload), engine=engine,  # type: ignore[arg-type]
                          pins=Pins(**pins))
    return plan(request).plans[0], request


@pytest.mark.parametrize(("zero", "micro"), [(0, 1), (1, 2), (2, 3), (3, 6)])
def test_deepspeed_config_passes_deepspeeds_batch_assertion(zero, micro):
    pytest.importorskip("deepspeed")
    best, request = chosen(zero_stage=zero, micro_batch=micro)
    config = json.loads(export_text(best, request, "deepspeed"))
    parsed = checks.deepspeed_config_at(config, world=16)
    assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) == (
        96, micro, 96 // (micro * 16))
    assert parsed.zero_optimization_stage == zero and parsed.bfloat16_config.enabled
    config["gradient_accumulation_steps"] += 1  # the same class rejects a triad that does not multiply out
    with pytest.raises(AssertionError, match="train_batch_size is not equal"):
        checks.deepspeed_config_at(config, world=16)


@pytest.mark.parametrize(("zero", "recompute", "every"), [(0, "none", 1), (2, "full", 1), (3, "full", 2)])
def test_hf_training_arguments_load_at_the_world_size(zero, recompute, every):
    pytest.importorskip("transformers")
    request = PlanRequest(model=load_model("tiny-llama-15m"), cluster=CLUSTER, seq_len=1024, global_batch_sequences=96,
                          settings=RunSettings(recompute="full", recompute_every=every) if every > 1 else RunSettings(),
                          engine="hf", pins=Pins(zero_stage=zero, recompute=recompute, micro_batch=2))
    best = plan(request).plans[0]
    got = checks.check_hf(export_text(best, request, "hf"), best, request)
    assert got == checks.expected(best, request, seq_len=False)
    assert (got.micro, got.accum, got.zero) == (2, 3, zero)


def test_hf_deepspeed_config_is_auto_where_the_trainer_fills_it():
    """A DeepSpeed config with explicit batch values breaks when the world size or max_grad_norm changes (the Trainer
    compares them, integrations/deepspeed.py:257-263); "auto" is filled from the TrainingArguments at any world size."""
    transformers = pytest.importorskip("transformers")
    best, request = chosen(engine="hf", zero_stage=3, micro_batch=2)
    config = json.loads(export_text(best, request, "hf-deepspeed"))
    assert config["train_batch_size"] == config["gradient_clipping"] == "auto"
    args = transformers.TrainingArguments(output_dir="/tmp/bp-hf", use_cpu=True, per_device_train_batch_size=2,
                                          gradient_accumulation_steps=3, bf16=True, max_grad_norm=0.5, deepspeed=config)
    for world in (16, 8):
        filled = checks.hf_filled_deepspeed(args, config, world=world, hidden_size=request.model.hidden_size)
        assert filled["train_batch_size"] == 2 * 3 * world and filled["gradient_clipping"] == 0.5
        assert filled["zero_optimization"]["reduce_bucket_size"] == request.model.hidden_size ** 2
        assert checks.deepspeed_config_at(filled, world=world).train_batch_size == 6 * world


@pytest.mark.parametrize(("zero", "recompute", "offload"), [(0, "none", False), (2, "none", True), (3, "full", False),
                                                            (2, "full", False)])
def test_lightning_trainer_accepts_the_arguments(zero, recompute, offload):
    pytest.importorskip("lightning")
    request = PlanRequest(model=load_model("tiny-llama-15m"), cluster=CLUSTER, seq_len=1024, global_batch_sequences=96,
                          settings=RunSettings(offload=offload), engine="lightning",
                          pins=Pins(zero_stage=zero, recompute=recompute))
    best = plan(request).plans[0]
    got = checks.check_lightning(export_text(best, request, "lightning"), best)
    assert got == checks.expected(best, request, seq_len=False)


def test_accelerate_config_builds_its_plugins_at_the_world_size():
    pytest.importorskip("accelerate")
    for zero in (3, 1):
        best, request = chosen(engine="hf", zero_stage=zero, recompute="full", micro_batch=2)
        text = export_text(best, request, "accelerate")
        got = checks.check_accelerate(text, best)
        assert (got.world, got.zero, got.accum) == (16, zero, 3)
        assert "num_processes: 16" in text and "num_machines: 2" in text


def test_torchrun_command_parses_with_torchruns_parser_and_the_runners_cli():
    import typer
    from torch.distributed.run import get_args_parser

    from batchpilot.cli import app

    best, request = chosen(engine="batchpilot", zero_stage=3, micro_batch=2)
    argv = torchrun_command(best, request, "corpus.jsonl")
    parsed = get_args_parser().parse_args(argv[1:])
    assert int(parsed.nnodes) * int(parsed.nproc_per_node) == 16
    assert parsed.module and parsed.training_script == "batchpilot.cli" and parsed.training_script_args[0] == "train"
    train = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    params = train.make_context("train", list(parsed.training_script_args[1:])).params  # parses, does not run
    assert params["global_batch"] == 96 and params["micro_batch"] == 2 and params["zero"] == 3
    assert params["expect_world_size"] == 16 and params["model"] == "tiny-llama-15m" and params["precision"] == "bf16"
    assert params["data"] == "corpus.jsonl" and params["seq_len"] == 1024
    assert params["global_batch"] // (params["micro_batch"] * params["expect_world_size"]) == best.triad.grad_accum_steps
    assert export_text(best, request, "torchrun").startswith("torchrun --nnodes 2 --nproc-per-node 8")


def test_torchrun_launches_megatron_with_its_environment():
    """Megatron-LM asserts CUDA_DEVICE_MAX_CONNECTIONS=1 with tp or cp > 1 before Blackwell
    (megatron/training/arguments.py:1453-1479 at d98e8a6): the launch line sets it."""
    from torch.distributed.run import get_args_parser

    best, request = chosen(engine="megatron", tp=2, pp=2)
    env, argv = checks.shell_argv(export_text(best, request, "torchrun"))
    assert env == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    parsed = get_args_parser().parse_args(argv[1:])
    assert parsed.training_script == "pretrain_gpt.py"
    assert parsed.training_script_args == megatron_args(best, request)
    got = checks.check_megatron(list(parsed.training_script_args), best, env=env)
    assert got == checks.expected(best, request, seq_len=True)
    notes = export(best, request, "megatron").notes
    assert any("CUDA_DEVICE_MAX_CONNECTIONS=1" in n for n in notes)


def test_megatron_arguments_multiply_out():
    best, request = chosen(engine="megatron", tp=2, pp=2, recompute="full", micro_batch=2)
    got = checks.check_megatron(megatron_args(best, request), best, env={"CUDA_DEVICE_MAX_CONNECTIONS": "1"})
    assert (got.tp, got.pp, got.micro, got.global_batch, got.dp) == (2, 2, 2, 96, 4)
    assert got.accum == best.triad.grad_accum_steps and got.recompute == "full" and got.precision == "bf16"


def test_exports_carry_the_data_path():
    best, request = chosen(engine="megatron", tp=2)
    assert "--data-path corpus.bin" in export_text(best, request, "megatron", ExportOptions(data="corpus.bin"))


@pytest.mark.parametrize("fmt", ["hf", "lightning", "accelerate", "deepspeed", "torchtitan"])
def test_tensor_parallel_plans_are_refused_where_inexpressible(fmt):
    best, request = chosen(engine="megatron", tp=2)
    with pytest.raises(ExportError, match=r"^--export .*(tensor|sequence) parallel") as err:
        export_text(best, request, fmt)
    assert "\n" not in str(err.value)


def test_every_format_names_its_file_suffix():
    """``batchpilot tune`` and the web page name export files from the one table."""
    assert list(SUFFIXES) == list(FORMATS)
    assert set(SUFFIXES.values()) == {"json", "sh", "yaml", "toml"}


def test_unknown_format_lists_the_known_ones():
    best, request = chosen()
    with pytest.raises(ExportError, match=", ".join(FORMATS)):
        export_text(best, request, "yaml")


def test_lora_and_qlora_are_stated_for_the_hf_trainer_and_refused_elsewhere():
    """LoRA/QLoRA are PEFT/bitsandbytes on the model (no TrainingArguments field): the hf export states them in
    their own names; engines without a setting for them refuse the plan."""
    from batchpilot.specs.finetune import parse_finetune

    qlora = RunSettings(finetune=parse_finetune("qlora,r=8,targets=q+v,paged"))
    request = PlanRequest(model=load_model("tiny-llama-15m"), cluster=CLUSTER, seq_len=1024,
                          global_batch_sequences=96, settings=qlora, engine="hf", pins=Pins(zero_stage=0))
    best = plan(request).plans[0]
    exported = export(best, request, "hf")
    assert json.loads(exported.text)["optim"] == "paged_adamw_32bit"
    model_note = next(n for n in exported.notes if n.startswith("model: "))
    assert "load_in_4bit=True" in model_note and "bnb_4bit_quant_type='nf4'" in model_note
    assert "LoraConfig(r=8, lora_alpha=16, target_modules=['q_proj', 'v_proj']" in model_note
    with pytest.raises(SpecError, match="--engine torchtitan: torchtitan has no paged optimizer states"):
        plan(PlanRequest(model=load_model("tiny-llama-15m"), cluster=CLUSTER, seq_len=1024, global_batch_sequences=96,
                         settings=qlora, engine="torchtitan"))


def test_batchpilot_runs_lora_under_ddp_and_its_launch_line_says_so():
    """The runner trains PEFT adapters on one process or under DDP (train/finetune.py), not under FSDP2: the
    planner keeps LoRA plans on DDP and the launch line carries --finetune."""
    import typer
    from torch.distributed.run import get_args_parser

    from batchpilot.cli import app
    from batchpilot.specs.finetune import parse_finetune

    lora = RunSettings(finetune=parse_finetune("lora,r=8"))
    request = PlanRequest(model=load_model("tiny-llama-15m"), cluster=CLUSTER, seq_len=1024, global_batch_sequences=96,
                          settings=lora, engine="batchpilot", top=5)
    result = plan(request)
    assert all(p.settings.zero_stage == 0 for p in result.plans)
    parsed = get_args_parser().parse_args(checks.shell_argv(export_text(result.plans[0], request, "torchrun"))[1][1:])
    train = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    params = train.make_context("train", list(parsed.training_script_args[1:])).params
    assert parse_finetune(params["finetune"]) == lora.finetune
    with pytest.raises(SpecError, match="--engine batchpilot cannot"):
        plan(PlanRequest(model=load_model("tiny-llama-15m"), cluster=CLUSTER, seq_len=1024, global_batch_sequences=96,
                         settings=lora, engine="batchpilot", pins=Pins(zero_stage=3)))
