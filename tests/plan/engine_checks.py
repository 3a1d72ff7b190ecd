"""Each engine's own validation of an export, on this CPU machine, at the plan's world size, and the plan read back
from what the engine parsed. One function per export format; each returns a :class:`ReadBack` to compare with
:func:`expected`.

The engines' code does the parsing and checking wherever it installs here (DeepSpeed 0.19.8, transformers 5.25.0,
accelerate 1.16.0, Lightning 2.6.6, torchtitan 0.2.2's config manager and ``ParallelDims``); what runs only with a
process group or a GPU is stated as the rule with its source (file:line in those versions, Megatron-LM at
``NVIDIA/Megatron-LM@d98e8a6``, whose training arguments are not installable). Those Megatron-LM rules agree with
its own ``parse_args`` + ``validate_args`` + ``core_transformer_config_from_args`` + the microbatch calculator, run
from a source checkout of d98e8a6 (triton stubbed, ``--no-rope-fusion``, 2-core CPU machine) on seven exported plans:
Llama 3 8B pp 4 × vpp 2, tp 2 × pp 2 × vpp 2 and cp 2; Qwen2.5-7B full recomputation, pp 2 × vpp 7; Mixtral 8x7B
ep 8, pp 2 × vpp 4; Llama 3 70B tp 4 × pp 8 × vpp 5; Llama 2 7B selective recomputation — all accepted.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import json
import math
import os
import shlex
import sys
import tempfile
import types
from dataclasses import dataclass
from typing import Any
from unittest import mock

from batchpilot.plan.request import Plan, PlanRequest


@dataclass(frozen=True)
class ReadBack:
    """What a plan relies on, as one engine understood it."""

    world: int
    micro: int
    accum: int
    dp: int
    global_batch: int
    zero: int
    offload: bool
    precision: str
    recompute: str
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    cp: int = 1
    seq_len: int | None = None
    """None where the engine has no setting for it."""


def expected(plan: Plan, request: PlanRequest, *, seq_len: bool) -> ReadBack:
    t, s = plan.triad, plan.settings
    return ReadBack(world=t.data_parallel_ranks * s.tp * s.pp * s.cp, micro=t.micro_batch_sequences,
                    accum=t.grad_accum_steps, dp=t.data_parallel_ranks, global_batch=t.global_batch_sequences,
                    zero=s.zero_stage, offload=s.offload, precision=s.precision,
                    recompute=s.recompute if s.recompute_every == 1 else f"{s.recompute}/{s.recompute_every}",
                    tp=s.tp, pp=s.pp, vpp=s.vpp, cp=s.cp, seq_len=request.seq_len if seq_len else None)


# ------------------------------------------------------------------------------------------------- DeepSpeed
def deepspeed_config_at(config: dict[str, Any], *, world: int, dp: int | None = None) -> Any:
    """``DeepSpeedConfig`` at ``world`` ranks. Without a process group it silently counts 1 rank
    (``runtime/config.py:473-474``), so ``deepspeed.comm``'s rank and world size are patched; a pipeline's data-parallel
    size comes from the module's grid, built from DeepSpeed's own ``PipeDataParallelTopology``
    (``runtime/pipe/topology.py:232``; ``deepspeed/__init__.py:581-584`` passes it as the mpu)."""
    import deepspeed.comm as dscomm
    from deepspeed.runtime.config import DeepSpeedConfig

    mpu = None
    if dp is not None and dp != world:
        from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

        topology = PipeDataParallelTopology(num_pp=world // dp, num_dp=dp)
        assert topology.world_size() == world
        mpu = types.SimpleNamespace(get_data_parallel_world_size=lambda: topology.get_dim("data"))
    with mock.patch.object(dscomm, "get_rank", return_value=0), \
         mock.patch.object(dscomm, "get_world_size", return_value=world):
        return DeepSpeedConfig(copy.deepcopy(config), mpu=mpu)


def check_deepspeed(text: str, plan: Plan) -> ReadBack:
    config = json.loads(text)
    s = plan.settings
    world = plan.triad.data_parallel_ranks * s.pp
    parsed = deepspeed_config_at(config, world=world, dp=plan.triad.data_parallel_ranks)
    pipeline = config.get("pipeline")
    if pipeline is not None:  # PipelineEngine.__init__ (runtime/pipe/engine.py:76-77, 103-105)
        assert parsed.zero_optimization_stage < 2, "ZeRO-2 and ZeRO-3 are incompatible with pipeline parallelism"
        assert parsed.pipeline["stages"] * parsed.world_size == world
    interval = parsed.pipeline["activation_checkpoint_interval"]
    return ReadBack(world=world, micro=parsed.train_micro_batch_size_per_gpu,
                    accum=parsed.gradient_accumulation_steps, dp=parsed.world_size,
                    global_batch=parsed.train_batch_size, zero=parsed.zero_optimization_stage,
                    offload=_ds_offloads(parsed), precision=_ds_precision(parsed),
                    recompute="full" if pipeline is not None and interval == 1 else "none",
                    pp=parsed.pipeline["stages"] if pipeline is not None else 1)


def _ds_offloads(parsed: Any) -> bool:
    offload = parsed.zero_config.offload_optimizer
    return offload is not None and str(getattr(offload.device, "value", offload.device)) == "cpu"


def _ds_precision(parsed: Any) -> str:
    return "bf16" if parsed.bfloat16_config.enabled else "fp16" if parsed.float16_config.enabled else "fp32"


# ------------------------------------------------------------------------------------------ Hugging Face Trainer
class _AtWorld:
    """``TrainingArguments`` as the Trainer sees them on ``world`` ranks (``args.world_size``)."""

    def __init__(self, args: Any, world: int) -> None:
        self._args, self.world_size = args, world

    def __getattr__(self, name: str) -> Any:
        return getattr(self._args, name)


def hf_filled_deepspeed(args: Any, config: dict[str, Any], *, world: int, hidden_size: int) -> dict[str, Any]:
    """The DeepSpeed config after the Trainer fills its "auto" values on ``world`` ranks: transformers'
    ``HfTrainerDeepSpeedConfig.trainer_config_process`` (at ``TrainingArguments`` creation) and
    ``trainer_config_finalize`` (in ``Trainer.train``, raises on values that disagree with the arguments)."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    hf = HfTrainerDeepSpeedConfig(copy.deepcopy(config))
    view = _AtWorld(args, world)
    hf.trainer_config_process(view)
    model = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=hidden_size))
    hf.trainer_config_finalize(view, model, 1000)
    unset_hf_deepspeed_config()
    return hf.config


def check_hf(text: str, plan: Plan, request: PlanRequest) -> ReadBack:
    from transformers import TrainingArguments

    kwargs = json.loads(text)
    kwargs["output_dir"] = tempfile.mkdtemp(prefix="bp-hf-")
    args = TrainingArguments(**kwargs, use_cpu=True)  # use_cpu: this machine has no GPU (bf16 is checked on one)
    world = plan.triad.data_parallel_ranks * plan.settings.tp * plan.settings.pp * plan.settings.cp
    zero, offload = 0, False
    recompute = "full" if args.activation_checkpointing else "none"
    if args.deepspeed:
        filled = hf_filled_deepspeed(args, kwargs["deepspeed"], world=world, hidden_size=request.model.hidden_size)
        parsed = deepspeed_config_at(filled, world=world)
        assert parsed.train_batch_size == world * args.per_device_train_batch_size * args.gradient_accumulation_steps
        zero, offload = parsed.zero_optimization_stage, _ds_offloads(parsed)
        assert _ds_precision(parsed) == ("bf16" if args.bf16 else "fp16" if args.fp16 else "fp32")
    if args.fsdp:
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)  # as Trainer.create_accelerator_and_postprocess
        assert plugin.fsdp_version == 2
        zero = 3 if plugin.reshard_after_forward else 2
        if plugin.activation_checkpointing:
            recompute = "full"
    every = (args.activation_checkpointing_kwargs or {}).get("every_n_layers", 1)
    return ReadBack(world=world, micro=args.per_device_train_batch_size, accum=args.gradient_accumulation_steps,
                    dp=world, global_batch=world * args.per_device_train_batch_size * args.gradient_accumulation_steps,
                    zero=zero, offload=offload, precision="bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
                    recompute=recompute if every == 1 else f"{recompute}/{every}")


# ------------------------------------------------------------------------------------------------- accelerate
def check_accelerate(text: str, plan: Plan) -> ReadBack:
    """accelerate's own path from ``accelerate launch --config_file`` to each worker's plugin: the file loader
    (unknown top-level keys raise, ``commands/config/config_args.py:148-160``), the nested keys against the launch
    parser (accelerate copies them with ``setattr`` unchecked, ``commands/launch.py:1313-1328``), the merge
    (``_validate_launch_command``), the workers' environment (``utils/launch.py``) and, in it, the plugin's
    ``__post_init__`` as ``Accelerator()`` builds it; for DeepSpeed the batch "auto" values as
    ``Accelerator._prepare_deepspeed`` fills them (``accelerator.py:2186-2197``), then ``DeepSpeedConfig``."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import (
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    cfg = load_config_from_file(f.name)
    parser = launch_command_parser()
    dests = {a.dest for a in parser._actions}
    for section in ("fsdp_config", "deepspeed_config", "dynamo_config"):
        for key in getattr(cfg, section, None) or {}:
            assert key in dests, f"accelerate would silently drop {section}.{key}"
    args, defaults, mp_from_config = _validate_launch_command(parser.parse_args(["--config_file", f.name, "train.py"]))
    os.unlink(f.name)
    world, micro, accum = int(args.num_processes), plan.triad.micro_batch_sequences, plan.triad.grad_accum_steps
    if args.use_deepspeed:  # the launcher launch_command picks (commands/launch.py:1417-1440)
        fields = list(defaults.deepspeed_config) if defaults else []
        args.deepspeed_fields_from_accelerate_config = ",".join(fields + (["mixed_precision"] if mp_from_config else []))
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.use_fsdp or args.multi_gpu:
        env = prepare_multi_gpu_env(args)
    else:
        _, env = prepare_simple_launcher_cmd_env(args)
    zero, offload, recompute = 0, False, plan.settings.recompute
    with mock.patch.dict(os.environ, env, clear=True):
        if args.use_fsdp:
            from accelerate.utils import FullyShardedDataParallelPlugin

            plugin = FullyShardedDataParallelPlugin()
            assert plugin.fsdp_version == 2
            zero = 3 if plugin.reshard_after_forward else 2
            assert plugin.activation_checkpointing == (recompute == "full" and plan.settings.recompute_every == 1)
        elif args.use_deepspeed:
            from accelerate.utils import DeepSpeedPlugin

            plugin = DeepSpeedPlugin()
            plugin.set_mixed_precision(args.mixed_precision)
            accum = plugin.get_value("gradient_accumulation_steps")
            plugin.deepspeed_config_process(must_match=False, train_micro_batch_size_per_gpu=micro,
                                            train_batch_size=micro * accum * world, gradient_clipping=1.0)
            parsed = deepspeed_config_at(plugin.deepspeed_config, world=world)
            zero, offload = parsed.zero_optimization_stage, _ds_offloads(parsed)
    precision = {"bf16": "bf16", "fp16": "fp16"}.get(str(env.get("ACCELERATE_MIXED_PRECISION", args.mixed_precision)), "fp32")
    nodes = int(args.num_machines or 1)
    assert world % nodes == 0
    return ReadBack(world=world, micro=micro, accum=accum, dp=world, global_batch=micro * accum * world, zero=zero,
                    offload=offload, precision=precision,
                    recompute=recompute if plan.settings.recompute_every == 1 else f"{recompute}/{plan.settings.recompute_every}")


# -------------------------------------------------------------------------------------------------- Lightning
def check_lightning(text: str, plan: Plan) -> ReadBack:
    """The Trainer on this CPU with the exported devices, nodes, precision, accumulation and strategy; DeepSpeed's
    config as the strategy formats it at fit time (``_format_config``: accumulation from the Trainer, micro-batch
    from the DataLoader, precision) checked by ``DeepSpeedConfig`` at the world size; FSDP's strategy built."""
    import lightning
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, StrategyRegistry

    exported = json.loads(text)
    kwargs, micro = exported["trainer"], exported["dataloader"]["batch_size"]
    strategy_kwargs = exported["strategy_kwargs"]
    assert kwargs["strategy"] in StrategyRegistry.available_strategies()
    world = kwargs["devices"] * kwargs["num_nodes"]
    zero, offload, recompute = 0, False, "none"
    if exported["strategy_class"] == "FSDPStrategy":  # FSDP refuses a CPU accelerator: build the strategy alone
        block = {_import(n) for n in strategy_kwargs["auto_wrap_policy"]}
        checkpointed = {_import(n) for n in strategy_kwargs.get("activation_checkpointing_policy", [])}
        strategy = FSDPStrategy(sharding_strategy=strategy_kwargs["sharding_strategy"], auto_wrap_policy=block,
                                activation_checkpointing_policy=checkpointed or None)
        zero = {"FULL_SHARD": 3, "SHARD_GRAD_OP": 2}[strategy.sharding_strategy.name]
        recompute = "full" if checkpointed else "none"
        accum = kwargs["accumulate_grad_batches"]
        precision = kwargs["precision"]
    else:
        strategy = DeepSpeedStrategy(**strategy_kwargs) if strategy_kwargs else kwargs["strategy"]
        trainer = lightning.Trainer(**{**kwargs, "accelerator": "cpu", "strategy": strategy}, logger=False,
                                    enable_checkpointing=False)
        assert trainer.world_size == world
        accum, precision = trainer.accumulate_grad_batches, kwargs["precision"]
        # on this CPU Lightning swaps fp16 AMP for bf16 (accelerator_connector.py:479); a GPU keeps it
        assert trainer.precision == precision or (precision, trainer.precision) == ("16-mixed", "bf16-mixed")
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            ds = trainer.strategy
            module = types.SimpleNamespace(trainer=trainer)
            with mock.patch.object(type(ds), "lightning_module", new=mock.PropertyMock(return_value=module)), \
                 mock.patch.object(ds, "_auto_select_batch_size", return_value=micro):
                ds._format_config()
            parsed = deepspeed_config_at(ds.config, world=world)
            assert parsed.train_batch_size == micro * accum * world
            zero, offload = parsed.zero_optimization_stage, _ds_offloads(parsed)
    return ReadBack(world=world, micro=micro, accum=accum, dp=world, global_batch=micro * accum * world, zero=zero,
                    offload=offload, precision={"bf16-mixed": "bf16", "16-mixed": "fp16", "32-true": "fp32"}[precision],
                    recompute=recompute)


def _import(path: str) -> type:
    module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    assert isinstance(cls, type)
    return cls


# ------------------------------------------------------------------------------------------------- torchtitan
def _torchtitan_modules() -> tuple[Any, Any]:
    """torchtitan 0.2.2's ``ConfigManager`` and ``ParallelDims``. ``import torchtitan`` needs triton (its package
    ``__init__`` imports the MoE kernels), which a CPU venv lacks; these two modules do not, so the package is
    registered without running its ``__init__``."""
    if "torchtitan" not in sys.modules:
        spec = importlib.util.find_spec("torchtitan")
        assert spec is not None and spec.submodule_search_locations
        package = types.ModuleType("torchtitan")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["torchtitan"] = package
    from torchtitan.config.manager import ConfigManager
    from torchtitan.distributed.parallel_dims import ParallelDims

    return ConfigManager, ParallelDims


def check_torchtitan(text: str, plan: Plan, request: PlanRequest) -> ReadBack:
    """torchtitan's TOML parser (unknown sections or fields raise, ``config/manager.py:160-181``) and
    ``ParallelDims`` (degrees multiply to the world size, ``distributed/parallel_dims.py:35-59``); then the rules that
    run inside the trainer with a process group, as stated in torchtitan and torch:
    batch ``train.py:195-215``; sequence divisor ``parallel_dims.py:365-372`` + ``models/llama3/infra/parallelize.py:69-74``;
    DDP only as the sole parallelism ``parallelize.py:148-151``; pipeline stages ``distributed/pipeline_parallel.py:54-114``
    and microbatches ``:186-202``; torch ``pipelining/schedules.py:1020`` (1F1B) and ``:2935-2942`` (interleaved)."""
    config_manager, parallel_dims = _torchtitan_modules()
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    with contextlib.redirect_stdout(None):
        cfg = config_manager().parse_args(["--job.config_file", f.name])
    os.unlink(f.name)
    p, t = cfg.parallelism, cfg.training
    world = plan.triad.data_parallel_ranks * plan.settings.tp * plan.settings.pp * plan.settings.cp
    dims = parallel_dims(dp_replicate=p.data_parallel_replicate_degree, dp_shard=p.data_parallel_shard_degree,
                         cp=p.context_parallel_degree, tp=p.tensor_parallel_degree, pp=p.pipeline_parallel_degree,
                         ep=p.expert_parallel_degree, etp=p.expert_tensor_parallel_degree, world_size=world)
    dp = dims.dp_replicate * dims.dp_shard
    assert t.global_batch_size % (t.local_batch_size * dp) == 0
    accum = t.global_batch_size // (t.local_batch_size * dp)
    assert t.seq_len % dims.seq_len_divisor == 0
    if not dims.fsdp_enabled and dims.dp_replicate_enabled:
        assert dims.dp_replicate == world, "DDP has not supported > 1D parallelism"
    if dims.ep > 1:
        assert (dims.dp_shard * dims.cp * dims.tp) % (dims.etp * dims.ep) == 0
    micro, vpp = t.local_batch_size, 1
    if dims.pp > 1:
        cls = get_schedule_class(p.pipeline_parallel_schedule)
        single = issubclass(cls, PipelineScheduleSingle)
        stages = dims.pp
        if p.pipeline_parallel_layers_per_stage is not None:
            eff = request.model.num_layers + p.pipeline_parallel_first_stage_less_layers + p.pipeline_parallel_last_stage_less_layers
            stages = math.ceil(eff / p.pipeline_parallel_layers_per_stage)
            assert stages % dims.pp == 0 and stages <= eff
            assert max(p.pipeline_parallel_first_stage_less_layers, p.pipeline_parallel_last_stage_less_layers) <= eff // stages
        per_rank = stages // dims.pp
        assert per_rank == 1 if single else per_rank >= 2
        assert t.local_batch_size % p.pipeline_parallel_microbatch_size == 0
        n = t.local_batch_size // p.pipeline_parallel_microbatch_size
        if cls.__name__ == "Schedule1F1B":
            assert n >= stages, f"1F1B microbatches {n} < stages {stages}"
        if cls.__name__ == "ScheduleInterleaved1F1B":
            assert n % max(1, n // dims.pp) == 0
        micro, accum, vpp = p.pipeline_parallel_microbatch_size, accum * n, per_rank
    ac = cfg.activation_checkpoint
    recompute = {"none": "none", "full": "full"}.get(ac.mode, "op" if ac.selective_ac_option == "op" else f"full/{ac.selective_ac_option}")
    zero = 0 if not dims.fsdp_enabled else 2 if p.fsdp_reshard_after_forward == "never" else 3
    precision = "fp32" if t.mixed_precision_param == "float32" else "bf16"
    if cfg.model.converters:
        precision = "fp8"
    return ReadBack(world=world, micro=micro, accum=accum, dp=dp, global_batch=t.global_batch_size, zero=zero,
                    offload=t.enable_cpu_offload, precision=precision, recompute=recompute, tp=dims.tp, pp=dims.pp,
                    vpp=vpp, cp=dims.cp, seq_len=t.seq_len)


# --------------------------------------------------------------------------------------------------- Megatron-LM
def megatron_values(argv: list[str]) -> dict[str, str | bool]:
    out: dict[str, str | bool] = {}
    for i, a in enumerate(argv):
        if a.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else "--"
            out[a] = True if nxt.startswith("--") else nxt
    return out


def check_megatron(argv: list[str], plan: Plan, *, env: dict[str, str]) -> ReadBack:
    """Megatron-LM's rules for these arguments (``megatron/training/arguments.py`` ``validate_args``, the
    transformer config and the schedules; cited line by line), at the plan's world size."""
    v = megatron_values(argv)
    num = lambda k, d=1: int(v[k]) if k in v else d  # noqa: E731
    world = plan.triad.data_parallel_ranks * plan.settings.tp * plan.settings.pp * plan.settings.cp
    tp, pp, cp = num("--tensor-model-parallel-size"), num("--pipeline-model-parallel-size"), num("--context-parallel-size")
    assert world % (tp * pp * cp) == 0  # arguments.py:427-434
    dp = world // (tp * pp * cp)  # arguments.py:448
    micro, global_batch, seq, layers = num("--micro-batch-size"), num("--global-batch-size"), num("--seq-length"), num("--num-layers")
    assert global_batch % (micro * dp) == 0  # arguments.py:715-720; num_microbatches_calculator.py:381-386
    accum = global_batch // (micro * dp)
    vpp = num("--num-virtual-stages-per-pipeline-rank")
    layout = v.get("--pipeline-model-parallel-layout")
    if isinstance(layout, str):
        stages = layout.split("|")
        assert sum(s.count("t") for s in stages) == layers and len(stages) % pp == 0
        vpp = len(stages) // pp
    elif vpp > 1:
        assert layers % pp == 0 and (layers // pp) % vpp == 0  # core/transformer/transformer_block.py:155-178
    elif pp > 1:
        assert layers % pp == 0  # arguments.py:985-998
    if vpp > 1:
        assert pp > 1  # arguments.py:1000-1009 (pp > 2 only without p2p overlap, which is on by default)
        assert accum % pp == 0  # core/pipeline_parallel/schedules.py:1160-1180 (group size pp, model_parallel_config.py:567-568)
    if cp > 1:
        assert seq % (2 * cp) == 0  # arguments.py:1335-1338
    if tp > 1 or cp > 1:
        assert env.get("CUDA_DEVICE_MAX_CONNECTIONS") == "1"  # arguments.py:1453-1479
    granularity = v.get("--recompute-granularity")
    if granularity == "full":  # core/transformer/transformer_config.py:1913-1925
        assert v.get("--recompute-method") in ("uniform", "block") and "--recompute-num-layers" in v
    if granularity == "selective":  # transformer_config.py:1926-1931
        assert "--recompute-num-layers" not in v
    if "--optimizer-cpu-offload" in v:  # arguments.py:1884-1892; core/optimizer/__init__.py:504-520
        assert "--use-precision-aware-optimizer" in v and "--use-distributed-optimizer" in v
    if "--num-experts" in v:
        ep = num("--expert-model-parallel-size")
        assert num("--num-experts") % ep == 0  # arguments.py:1655-1658
        assert world % (tp * ep * pp) == 0  # core/parallel_state.py:874-884 (expert tensor parallel = tp)
    recompute = "none"
    if granularity == "selective":
        recompute = "selective"
    elif granularity == "full":
        recompute = "full" if v["--recompute-method"] == "uniform" else f"full/block {num('--recompute-num-layers')}"
    precision = "fp8" if "--fp8-format" in v else "bf16" if "--bf16" in v else "fp16" if "--fp16" in v else "fp32"
    return ReadBack(world=world, micro=micro, accum=accum, dp=dp, global_batch=global_batch,
                    zero=1 if "--use-distributed-optimizer" in v else 0, offload="--optimizer-cpu-offload" in v,
                    precision=precision, recompute=recompute, tp=tp, pp=pp, vpp=vpp, cp=cp, seq_len=seq)


def shell_argv(line: str) -> tuple[dict[str, str], list[str]]:
    """(environment assignments, argv) of one exported shell line."""
    words = shlex.split(line)
    env = {}
    while words and "=" in words[0] and not words[0].startswith("-"):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return env, words
