"""What each training engine runs: one capability table (data, each entry with its source) and the checks the
planner and the exports share.

``plan --engine NAME`` searches only what NAME runs *from its own configuration* (a setting the exported
config, arguments or command line switches on); what an engine does only when the user's model code does it
(a DeepSpeed ``PipelineModule`` aside, see below) is listed in :attr:`Capabilities.model_code` and not
searched, so every plan exports whole. The memory bookkeeping (``RunSettings.engine``: ``torch``, ``fsdp2``,
``deepspeed``, ``megatron``) follows from the data-parallel scheme the engine uses (:class:`Sharding`).

    >>> caps = get_engine("hf")
    >>> [(s.zero_stage, s.bookkeeping) for s in caps.shardings]
    [(0, 'torch'), (0, 'deepspeed'), (1, 'deepspeed'), (2, 'deepspeed'), (3, 'deepspeed'), (2, 'fsdp2'), (3, 'fsdp2')]
    >>> get_engine("deepspeed").pipeline_schedules, get_engine("megatron").pipeline_schedules
    (('1F1B',), ('1F1B', 'interleaved'))
    >>> pipeline_problem(get_engine("torchtitan"), pp=4, vpp=1, accum=2)
    'torchtitan 1F1B needs at least pp 4 microbatches per step (accumulation 2); torch Schedule1F1B refuses fewer (torch/distributed/pipelining/schedules.py:1020)'

Versions read (file:line below are in these): DeepSpeed 0.19.8 (PyPI wheel); transformers 5.25.0 and accelerate
1.16.0 (PyPI); Lightning 2.6.6 (PyPI); torchtitan 0.2.2 (tag v0.2.2 = ``pytorch/torchtitan@73a0e69``); torch
2.13.0 (``torch/distributed/pipelining``); Megatron-LM ``NVIDIA/Megatron-LM@d98e8a6``; batchpilot's own runner
(``batchpilot train``: ``src/batchpilot/train/parallelize.py`` ``parallelize``).

The DeepSpeed pipeline is the one model-code feature searched: DeepSpeed runs a pipeline only from a
``PipelineModule``, but its config carries every pipeline setting the plan relies on (stages, the
data-parallel batch product through the module's grid, recomputation through
``pipeline.activation_checkpoint_interval``), so the export is whole once the model is a ``PipelineModule``;
the export says so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, get_args

from batchpilot.errors import SpecError
from batchpilot.specs.settings import Engine, FP8Recipe, Optimizer, Precision, Recompute, RunSettings

EngineName = Literal["batchpilot", "deepspeed", "hf", "lightning", "torchtitan", "megatron"]
ENGINE_NAMES: tuple[str, ...] = get_args(EngineName)

LEGACY_ENGINES: Mapping[str, str] = MappingProxyType({"torch": "batchpilot", "fsdp2": "torchtitan"})
"""``--engine`` values from before engines were launchers (they named the memory bookkeeping only): ``torch``
(DDP under autocast) is batchpilot's runner, ``fsdp2`` is torchtitan (the FSDP2 reference trainer)."""

DEFAULT_ENGINE: EngineName = "hf"
"""``plan``'s engine when none is given: the Hugging Face Trainer (DDP, DeepSpeed ZeRO-1/2/3 or FSDP2, activation
checkpointing, offload), the most common way these models are fine-tuned and trained; its plans export with
``--export hf`` (``TrainingArguments``), ``accelerate`` and ``hf-deepspeed``."""

Schedule = Literal["1F1B", "interleaved"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Sharding:
    """One data-parallel scheme an engine runs: its ZeRO stage, whose memory bookkeeping applies, and what
    the engine allows with it."""

    zero_stage: int
    """0 plain data parallel; 1 optimizer states sharded; 2 + gradients; 3 + parameters."""
    bookkeeping: Engine
    """The :class:`~batchpilot.specs.settings.RunSettings` ``engine`` whose memory accounting applies."""
    name: str
    """The scheme in the engine's own words (for messages)."""
    source: str
    """Where the engine defines it."""
    alone_only: bool = False
    """Runs only as the sole parallelism (no tp, pp, cp or ep)."""
    needs_group: bool = False
    """Applies only over more than one rank (dp × cp > 1); on one it is not applied at all."""
    finetune: bool = True
    """Runs the engine's fine-tuning methods (LoRA, QLoRA, frozen layers) with this scheme."""
    offload: bool = False
    """Optimizer states can live in CPU memory (the plan's ``offload``)."""
    optimizers: tuple[Optimizer, ...] = ("adamw",)
    """Optimizers the engine's configuration selects with this scheme."""
    recompute: tuple[Recompute, ...] = ("none",)
    """Recomputation policies the configuration switches on without a pipeline."""
    pipeline_recompute: tuple[Recompute, ...] | None = None
    """With pp > 1 (None: as ``recompute``)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Capabilities:
    """What one engine runs from its own configuration, with the source of each entry."""

    name: EngineName
    title: str
    version: str
    """The release or commit the entries were read from."""
    exports: tuple[str, ...]
    """``--export`` formats for this engine; the first is its own."""
    shardings: tuple[Sharding, ...]
    precisions: tuple[Precision, ...] = ("fp32", "bf16", "fp16")
    fp8_recipes: tuple[FP8Recipe, ...] = ()
    tp: bool = False
    """Tensor parallelism from the configuration."""
    sequence_parallel: Literal["never", "optional", "always"] = "never"
    """Megatron-style sequence parallelism over the tensor-parallel group: ``always`` on with tp > 1
    (torchtitan), a switch (Megatron-LM) or absent."""
    pipeline_schedules: tuple[Schedule, ...] = ()
    """``1F1B`` (plain, vpp 1) and ``interleaved`` (vpp > 1); empty: no pipeline parallelism."""
    pipeline_max_zero: int = 3
    """Highest ZeRO stage with pp > 1."""
    pipeline_with_tp: bool = True
    pipeline_offload: bool = True
    """Optimizer offload together with a pipeline."""
    cp: bool = False
    ep: bool = False
    every_n: tuple[Recompute, ...] = ()
    """Policies that can checkpoint 1 layer in N (``recompute_every`` > 1)."""
    compile: bool = False
    hybrid_shard: bool = False
    param_dtype_bf16: bool = False
    """Pure bf16 training (bf16 parameters and optimizer states)."""
    finetune: tuple[str, ...] = ("full",)
    """Fine-tuning methods (:mod:`batchpilot.specs.finetune`) the engine runs; besides ``full``, LoRA/QLoRA, frozen
    layers and paged optimizer states only where an export states them (the HF Trainer through PEFT and
    bitsandbytes)."""
    sources: Mapping[str, str] = field(default_factory=dict)
    """Capability → where the engine defines it (file:line in :attr:`version`)."""
    model_code: tuple[str, ...] = ()
    """What the engine also runs when the user's model or script does it (not searched)."""

    def sharding(self, bookkeeping: str, zero_stage: int) -> Sharding | None:
        return next((s for s in self.shardings if s.bookkeeping == bookkeeping and s.zero_stage == zero_stage), None)

    def describe_shardings(self) -> str:
        """``ZeRO-0 DDP, ZeRO-1/2/3 DeepSpeed, ZeRO-2/3 FSDP2`` (for messages): stages grouped by bookkeeping."""
        groups: dict[str, list[Sharding]] = {}
        for s in self.shardings:
            groups.setdefault(s.bookkeeping if s.bookkeeping != "megatron" else s.name, []).append(s)
        return ", ".join("ZeRO-" + "/".join(str(s.zero_stage) for s in group) + " " + min((s.name for s in group), key=len)
                         for group in groups.values())


_DS = "deepspeed 0.19.8"
_HF = "transformers 5.25.0"
_AC = "accelerate 1.16.0"
_PL = "lightning 2.6.6"
_TT = "torchtitan v0.2.2"
_MG = "Megatron-LM d98e8a6"
_HF_OPTIMIZERS: tuple[Optimizer, ...] = ("adamw", "adamw-8bit", "sgd-momentum", "adafactor")

BATCHPILOT = Capabilities(
    name="batchpilot", title="batchpilot's runner (batchpilot train)", version="this repository",
    exports=("torchrun",),
    shardings=(
        Sharding(zero_stage=0, bookkeeping="torch", name="DDP", alone_only=True, recompute=("none", "op", "full"),
                 source="train/parallelize.py apply_ddp (DistributedDataParallel; torch.autocast in "
                        "measure/step.py; no DDP with tensor parallelism)"),
        Sharding(zero_stage=2, bookkeeping="fsdp2", name="FSDP2 --zero 2 (reshard_after_forward=False)",
                 recompute=("none", "op", "full"), finetune=False,
                 source="train/parallelize.py apply_fsdp (torchtitan's units; MixedPrecisionPolicy bf16 params, "
                        "fp32 reduce)"),
        Sharding(zero_stage=3, bookkeeping="fsdp2", name="FSDP2 --zero 3", recompute=("none", "op", "full"),
                 finetune=False,
                 source="train/parallelize.py apply_fsdp (torchtitan apply_fsdp_to_decoder units and "
                        "reshard_after_forward policies; meta-device init, broadcast_from_rank0)"),
    ),
    precisions=("fp32", "bf16", "fp16", "fp8"), fp8_recipes=("tensorwise", "rowwise"),
    tp=True, every_n=("op", "full"), compile=True, finetune=("full", "lora", "qlora"),
    sources=MappingProxyType({
        "optimizer": "measure/step.py make_optimizer (AdamW; train has no --optimizer)",
        "precision": "cli/train.py --precision (fp32, bf16, fp16; fp8 through torchao on CUDA only)",
        "fp8": "train/parallelize.py apply_fp8 (torchao convert_to_float8_training, Float8LinearConfig."
               "from_recipe_name tensorwise|rowwise; CUDA only)",
        "recompute": "train/parallelize.py apply_recompute (checkpoint_wrapper per decoder layer before FSDP2, "
                     "measure/recompute.py's op policy and 1-in-N selection; selective is not applied)",
        "tensor parallel": "train/parallelize.py apply_tp (the model's base_model_tp_plan colwise/rowwise, "
                           "embedding rowwise, vocabulary-sharded head with loss_parallel; no sequence "
                           "parallelism; with FSDP2 only)",
        "compile": "train/parallelize.py apply_compile (each decoder layer, after recomputation, before FSDP2) "
                   "and the loss (train/loop.py)",
        "offload": "batchpilot train keeps the optimizer on the device (train/loop.py)",
        "finetune": "train/finetune.py: PEFT LoRA/QLoRA and frozen layers on one process or under DDP (FSDP2 and "
                    "tensor parallelism refused)",
    }),
)

DEEPSPEED = Capabilities(
    name="deepspeed", title="DeepSpeed (config JSON)", version=_DS, exports=("deepspeed",),
    shardings=tuple(
        Sharding(zero_stage=z, bookkeeping="deepspeed", name="DeepSpeed",
                 source=f"{_DS} runtime/zero/config.py:95 zero_optimization.stage", offload=z >= 1,
                 pipeline_recompute=("none", "full"))
        for z in (0, 1, 2, 3)),
    pipeline_schedules=("1F1B",), pipeline_max_zero=1, pipeline_with_tp=False, pipeline_offload=False,
    sources=MappingProxyType({
        "pipeline": f"{_DS} runtime/pipe/schedule.py:189 TrainSchedule (1F1B); no interleaved schedule (DualPipeV "
                    "is a V-shaped 2-stage-per-rank schedule, runtime/pipe/dualpipev.py:94-104)",
        "pipeline zero": f"{_DS} runtime/pipe/engine.py:76-77 (ZeRO-2 and ZeRO-3 are incompatible with pipeline "
                         "parallelism)",
        "pipeline batch": f"{_DS} runtime/pipe/engine.py:103-105 and runtime/config.py:459-463 (train_batch_size = "
                          "micro × gas × the module grid's data-parallel size)",
        "pipeline recompute": f"{_DS} runtime/pipe/engine.py:217-218 pipeline.activation_checkpoint_interval",
        "recompute": f"{_DS} activation_checkpointing only configures deepspeed.checkpointing.checkpoint, which "
                     "the model must call: the config alone recomputes nothing without a pipeline",
        "offload": f"{_DS} runtime/zero/offload_config.py:21-108 offload_optimizer (stages 1-3); not claimed with "
                   "the PipelineEngine (its ZeRO-1 path is not documented with offload)",
        "tensor parallel": f"{_DS} AutoTP (tensor_parallel.autotp_size) counts every rank in the batch product "
                          "(runtime/config.py:602-605, groups built later in runtime/engine.py:940-958), so the "
                          "config cannot state a tensor-parallel plan's global batch",
        "fp8": f"{_DS} has no fp8 section (Transformer Engine in model code)",
    }),
    model_code=("recomputation without a pipeline (deepspeed.checkpointing)", "Megatron-style tensor parallelism",
                "AutoTP", "Ulysses sequence parallelism", "DeepSpeed-MoE expert parallelism"),
)

HF = Capabilities(
    name="hf", title="Hugging Face Trainer / accelerate", version=f"{_HF}, {_AC}",
    exports=("hf", "accelerate", "hf-deepspeed"),
    shardings=(
        Sharding(zero_stage=0, bookkeeping="torch", name="DDP", optimizers=_HF_OPTIMIZERS,
                 recompute=("none", "full"),
                 source=f"{_HF} training_args.py:1447-1467 (no fsdp, no deepspeed: accelerate MULTI_GPU)"),
        *(Sharding(zero_stage=z, bookkeeping="deepspeed", name="DeepSpeed", offload=z >= 1, recompute=("none", "full"),
                   source=f"{_HF} training_args.py:1704-1721 (deepspeed=...), integrations/deepspeed.py:138-263")
          for z in (0, 1, 2, 3)),
        Sharding(zero_stage=2, bookkeeping="fsdp2", name="FSDP2 reshard_after_forward=False", recompute=("none", "full"),
                 source=f"{_HF} training_args.py:2826-2862 (fsdp_config version 2, reshard_after_forward)"),
        Sharding(zero_stage=3, bookkeeping="fsdp2", name="FSDP2", recompute=("none", "full"),
                 source=f"{_HF} training_args.py:2826-2862"),
    ),
    every_n=("full",), compile=True, finetune=("full", "lora", "qlora"),
    sources=MappingProxyType({
        "finetune": "PEFT LoraConfig(r, lora_alpha, target_modules, lora_dropout, layers_to_transform) on the model, "
                    "bitsandbytes BitsAndBytesConfig(load_in_4bit, nf4, double quant) at from_pretrained for QLoRA "
                    f"(model code: the hf export states them); paged states: {_HF} training_args.py:134-135 optim "
                    "paged_adamw_32bit / paged_adamw_8bit",
        "recompute": f"{_HF} training_args.py:908-937 activation_checkpointing (+ _kwargs every_n_layers: "
                     "modeling_utils.py:3245-3248 checkpoints layers 0, N, 2N, …)",
        "optimizer": f"{_HF} training_args.py:118-129 optim adamw_torch, adamw_bnb_8bit, sgd (optim_args momentum, "
                     "trainer_optimizer.py:317-326), adafactor; 8-bit, SGD and Adafactor searched with DDP only",
        "offload": f"{_HF} DeepSpeed offload_optimizer; {_AC} deepspeed_config offload_optimizer_device "
                   "(commands/launch.py:412-510)",
        "compile": f"{_HF} training_args.py:940 torch_compile",
        "tensor parallel": f"{_HF} not a TrainingArguments field: DistributedConfig(tp_size) at from_pretrained "
                          "(trainer.py:769-790)",
        "context parallel": f"{_AC} parallelism_config_cp_size (FSDP2 only, parallelism_config.py:291-337): not "
                           "a TrainingArguments JSON value",
        "fp8": f"{_HF} TrainingArguments sets accelerate's mixed precision from bf16/fp16 (training_args.py:1612-1618)",
    }),
    model_code=("tensor parallelism (DistributedConfig / tp_plan)", "context parallelism (ParallelismConfig)"),
)

LIGHTNING = Capabilities(
    name="lightning", title="Lightning Trainer", version=_PL, exports=("lightning",),
    shardings=(
        Sharding(zero_stage=0, bookkeeping="torch", name="DDP", optimizers=("adamw", "adamw-8bit"),
                 source=f"{_PL} strategy='ddp'"),
        *(Sharding(zero_stage=z, bookkeeping="deepspeed", name="DeepSpeed", offload=True,
                   source=f"{_PL} pytorch/strategies/deepspeed.py:780-812 deepspeed_stage_{z}; "
                          "DeepSpeedStrategy(stage, offload_optimizer)")
          for z in (1, 2, 3)),
        Sharding(zero_stage=2, bookkeeping="fsdp2", name="FSDP (SHARD_GRAD_OP)", recompute=("none", "full"),
                 source=f"{_PL} pytorch/strategies/fsdp.py:147-195 (FSDP1 flat parameters, counted as FSDP2)"),
        Sharding(zero_stage=3, bookkeeping="fsdp2", name="FSDP", recompute=("none", "full"),
                 source=f"{_PL} pytorch/strategies/fsdp.py:147-195"),
    ),
    sources=MappingProxyType({
        "recompute": f"{_PL} FSDPStrategy(activation_checkpointing_policy={{block class}}) (fsdp.py:160); DDP and "
                     "DeepSpeed recompute only in model code",
        "optimizer": f"{_PL} LightningModule.configure_optimizers (the export names the class)",
        "tensor parallel": f"{_PL} ModelParallelStrategy + parallelize_module in configure_model "
                          "(pytorch/strategies/model_parallel.py:64-93)",
        "precision": f"{_PL} fabric/plugins/precision/precision.py:25-35 (32-true, bf16-mixed, 16-mixed)",
    }),
    model_code=("tensor parallelism (ModelParallelStrategy)", "recomputation under DDP or DeepSpeed",
                "fp8 (precision='transformer-engine')"),
)

TORCHTITAN = Capabilities(
    name="torchtitan", title="torchtitan (job TOML)", version=_TT, exports=("torchtitan",),
    shardings=(
        Sharding(zero_stage=0, bookkeeping="torch", name="DDP", alone_only=True, recompute=("none", "op", "full"),
                 source=f"{_TT} models/llama3/infra/parallelize.py:148-151 (DDP has not supported > 1D parallelism)"),
        Sharding(zero_stage=2, bookkeeping="fsdp2", name="FSDP2 fsdp_reshard_after_forward='never'",
                 recompute=("none", "op", "full"), needs_group=True,
                 source=f"{_TT} config/job_config.py:336, models/llama3/infra/parallelize.py:320-331"),
        Sharding(zero_stage=3, bookkeeping="fsdp2", name="FSDP2", recompute=("none", "op", "full"), needs_group=True,
                 source=f"{_TT} config/job_config.py:312-350 data_parallel_shard_degree; FSDP only when "
                        "dp_shard or cp > 1 (distributed/parallel_dims.py:333-335), and without it mixed "
                        "precision is off under tp or pp (distributed/utils.py:243-263)"),
    ),
    precisions=("fp32", "bf16", "fp8"), fp8_recipes=("tensorwise", "rowwise", "mxfp8"),
    tp=True, sequence_parallel="always", pipeline_schedules=("1F1B", "interleaved"), cp=True, ep=True,
    every_n=("full",), compile=True, hybrid_shard=True, param_dtype_bf16=True,
    sources=MappingProxyType({
        "tensor parallel": f"{_TT} config/job_config.py:351 tensor_parallel_degree; norms always SequenceParallel "
                          "(models/llama3/infra/parallelize.py:181-233)",
        "pipeline": f"{_TT} config/job_config.py:396-405 pipeline_parallel_schedule (1F1B, Interleaved1F1B); "
                    "torch pipelining schedules.py:1020 (1F1B microbatches ≥ stages), 2935-2942 (interleaved rounds)",
        "context parallel": f"{_TT} config/job_config.py:428-446 context_parallel_degree",
        "expert parallel": f"{_TT} config/job_config.py:454-474 expert_parallel_degree",
        "recompute": f"{_TT} config/job_config.py:651-713 activation_checkpoint.mode none|selective|full, "
                     "selective_ac_option 'op' or N (distributed/activation_checkpoint.py:168-185)",
        "fp8": f"{_TT} model.converters quantize.linear.float8 recipe_name tensorwise|rowwise "
               "(config/job_config.py:731-747), quantize.linear.mx (mxfp8)",
        "compile": f"{_TT} config/job_config.py:721-727 [compile] enable",
        "precision": f"{_TT} training.mixed_precision_param bfloat16|float32 (no fp16)",
        "offload": f"{_TT} training.enable_cpu_offload moves parameters, gradients and optimizer states "
                   "(parallelize.py:134-145), more than optimizer offload: not searched",
    }),
)

MEGATRON = Capabilities(
    name="megatron", title="Megatron-LM (pretrain_gpt.py)", version=_MG, exports=("megatron", "torchrun"),
    shardings=(
        Sharding(zero_stage=0, bookkeeping="megatron", name="DDP", optimizers=("adamw", "sgd-momentum"),
                 recompute=("none", "selective", "full"), source=f"{_MG} megatron/training/arguments.py:448"),
        Sharding(zero_stage=1, bookkeeping="megatron", name="distributed optimizer", offload=True,
                 optimizers=("adamw", "sgd-momentum"), recompute=("none", "selective", "full"),
                 source=f"{_MG} megatron/training/arguments.py:3156 --use-distributed-optimizer"),
    ),
    precisions=("fp32", "bf16", "fp16", "fp8"), fp8_recipes=("tensorwise", "delayed", "mxfp8", "blockwise"),
    tp=True, sequence_parallel="optional", pipeline_schedules=("1F1B", "interleaved"), pipeline_max_zero=1,
    cp=True, ep=True, every_n=("full",),
    sources=MappingProxyType({
        "layout": f"{_MG} megatron/training/arguments.py:427-448 (world % (tp·pp·cp), dp = world / (tp·pp·cp))",
        "interleaved": f"{_MG} arguments.py:928-976 --num-virtual-stages-per-pipeline-rank; "
                       "core/pipeline_parallel/schedules.py:1160-1180 (microbatches a multiple of the group, "
                       "which defaults to pp: core/model_parallel_config.py:567-568)",
        "recompute": f"{_MG} core/transformer/transformer_config.py:1901-1966 (full: uniform 1 or block N; "
                     "selective: core_attn)",
        "offload": f"{_MG} arguments.py:1884-1892 --optimizer-cpu-offload needs --use-precision-aware-optimizer; "
                   "core/optimizer/__init__.py:504-520 (HybridDeviceOptimizer, distributed optimizer)",
        "optimizer": f"{_MG} arguments.py:2913 --optimizer adam (decoupled weight decay) | sgd",
        "fp8": f"{_MG} core/transformer/transformer_config.py:587-611 --fp8-format, --fp8-recipe",
        "env": f"{_MG} arguments.py:1453-1479 CUDA_DEVICE_MAX_CONNECTIONS=1 with tp or cp > 1 before Blackwell",
        "compile": "Megatron-LM fuses with Transformer Engine and Apex kernels; no torch.compile switch",
    }),
)

ENGINES: Mapping[str, Capabilities] = MappingProxyType(
    {c.name: c for c in (BATCHPILOT, DEEPSPEED, HF, LIGHTNING, TORCHTITAN, MEGATRON)})
"""The capability table, by ``--engine`` name."""


def get_engine(name: str) -> Capabilities:
    """The engine called ``name`` (case-insensitive; the legacy ``torch``/``fsdp2`` included); one-line error
    listing the engines otherwise."""
    key = str(name).strip().lower()
    key = LEGACY_ENGINES.get(key, key)
    caps = ENGINES.get(key)
    if caps is None:
        raise SpecError(f"--engine {name!r} is not an engine; use one of {', '.join(ENGINE_NAMES)}")
    return caps


def engine_for_bookkeeping(bookkeeping: str) -> Capabilities:
    """The engine a request that names only the memory bookkeeping means (``RunSettings.engine``)."""
    return get_engine(bookkeeping)


def shardings_for(caps: Capabilities, *, tp: int, pp: int, cp: int, ep: int, dp: int) -> tuple[Sharding, ...]:
    """The data-parallel schemes ``caps`` runs with this layout (``dp`` data-parallel ranks)."""
    model_parallel = tp * pp * cp * ep > 1
    return tuple(s for s in caps.shardings
                 if not (s.alone_only and model_parallel) and not (s.needs_group and dp * cp == 1)
                 and not (pp > 1 and s.zero_stage > caps.pipeline_max_zero))


def recompute_for(sharding: Sharding, pp: int) -> tuple[Recompute, ...]:
    """Recomputation policies the scheme switches on from the configuration at ``pp`` stages."""
    if pp > 1 and sharding.pipeline_recompute is not None:
        return sharding.pipeline_recompute
    return sharding.recompute


def pipeline_problem(caps: Capabilities, *, pp: int, vpp: int, accum: int) -> str | None:
    """Why ``caps`` cannot run ``pp`` stages × ``vpp`` virtual stages with ``accum`` microbatches per step, or
    None (the schedule's own rule, cited)."""
    if pp == 1:
        return None
    if not caps.pipeline_schedules:
        return f"{caps.name} has no pipeline parallelism"
    if vpp > 1 and "interleaved" not in caps.pipeline_schedules:
        return (f"{caps.name} has no interleaved pipeline schedule (vpp {vpp}): "
                f"{caps.sources.get('pipeline', 'plain 1F1B only')}")
    if caps.name == "megatron" and vpp > 1 and accum % pp:
        return (f"Megatron-LM's interleaved schedule runs microbatches in groups of pp {pp}: accumulation {accum} "
                f"must be a multiple of {pp} (core/pipeline_parallel/schedules.py:1160-1180)")
    if caps.name == "torchtitan":
        if vpp == 1 and accum < pp:
            return (f"torchtitan 1F1B needs at least pp {pp} microbatches per step (accumulation {accum}); torch "
                    f"Schedule1F1B refuses fewer (torch/distributed/pipelining/schedules.py:1020)")
        rounds = max(1, accum // pp)
        if vpp > 1 and accum % rounds:
            return (f"torchtitan Interleaved1F1B runs max(1, {accum} // pp {pp}) = {rounds} rounds: accumulation "
                    f"{accum} must be a multiple of {rounds} (torch/distributed/pipelining/schedules.py:2935-2942)")
    return None


def plan_problems(caps: Capabilities, settings: RunSettings, *, dp: int, accum: int, seq_len: int) -> list[str]:
    """Why ``caps`` cannot run a plan with these settings (one line each, with the rule and its source); empty
    when it runs it from its own configuration."""
    s = settings
    out = _layout_problems(caps, s, accum=accum, seq_len=seq_len)
    sharding = caps.sharding(s.engine, s.zero_stage)
    if sharding is None:
        out.append(f"{caps.name} runs {caps.describe_shardings()}, not ZeRO-{s.zero_stage} with {s.engine} "
                   f"bookkeeping; plan with --engine {caps.name}")
    else:
        out += _sharding_problems(caps, sharding, s, dp=dp)
    out += _settings_problems(caps, s)
    return out


def _sharding_problems(caps: Capabilities, sharding: Sharding, s: RunSettings, *, dp: int) -> list[str]:
    out = []
    if sharding.needs_group and dp * s.cp == 1:
        out.append(f"{caps.name} applies {sharding.name} only over more than one rank (dp {dp}, cp {s.cp}): "
                   f"{sharding.source}")
    if sharding.alone_only and s.tp * s.pp * s.cp * s.ep > 1:
        out.append(f"{caps.name} {sharding.name} runs only as the sole parallelism ({sharding.source}); "
                   f"tp {s.tp}, pp {s.pp}, cp {s.cp}, ep {s.ep} need another sharding")
    if s.pp > 1 and s.zero_stage > caps.pipeline_max_zero:
        out.append(f"{caps.name} allows ZeRO ≤ {caps.pipeline_max_zero} with a pipeline, not ZeRO-{s.zero_stage} "
                   f"({caps.sources.get('pipeline zero', caps.name)})")
    if s.offload and s.pp > 1 and not caps.pipeline_offload:
        out.append(f"{caps.name} keeps optimizer states on the GPU with a pipeline ({caps.sources.get('offload', '')})")
    if s.offload and not sharding.offload:
        out.append(f"{caps.name} {sharding.name} cannot keep optimizer states in CPU memory "
                   f"({caps.sources.get('offload', 'no such setting')})")
    if s.optimizer not in sharding.optimizers:
        out.append(f"{caps.name} {sharding.name} selects {', '.join(sharding.optimizers)}, not {s.optimizer} "
                   f"({caps.sources.get('optimizer', sharding.source)})")
    if not sharding.finetune and (s.finetune.method != "full" or s.finetune.frozen_layers):
        out.append(f"{caps.name} {sharding.name} does not run --finetune {s.finetune.method} "
                   f"({caps.sources.get('finetune', sharding.source)})")
    allowed = recompute_for(sharding, s.pp)
    if s.recompute not in allowed:
        out.append(f"{caps.name} {sharding.name} switches on recompute {', '.join(allowed)} from its configuration, "
                   f"not {s.recompute}" + (f" at pp {s.pp}" if s.pp > 1 else "")
                   + f" ({caps.sources.get('recompute', 'no such setting')})")
    return out


def _layout_problems(caps: Capabilities, s: RunSettings, *, accum: int, seq_len: int) -> list[str]:
    out = []
    if s.tp > 1 and not caps.tp:
        out.append(f"{caps.name} has no tensor parallelism in its configuration (tp {s.tp}): "
                   f"{caps.sources.get('tensor parallel', 'model code')}")
    if s.tp > 1 and s.pp > 1 and not caps.pipeline_with_tp:
        out.append(f"{caps.name} pipelines without tensor parallelism only (tp {s.tp}, pp {s.pp})")
    if s.cp > 1 and not caps.cp:
        out.append(f"{caps.name} has no context parallelism in its configuration (cp {s.cp})")
    if s.ep > 1 and not caps.ep:
        out.append(f"{caps.name} has no expert parallelism in its configuration (ep {s.ep})")
    if s.tp > 1 and caps.sequence_parallel == "always" and not s.sp:
        out.append(f"{caps.name} always runs sequence parallelism with tp > 1 "
                   f"({caps.sources.get('tensor parallel', '')}); plan with --sp")
    problem = pipeline_problem(caps, pp=s.pp, vpp=s.vpp, accum=accum)
    if problem:
        out.append(problem)
    divisor = _seq_divisor(caps, s)
    if seq_len % divisor:
        out.append(f"{caps.name} needs the sequence length {seq_len} to be a multiple of {divisor} "
                   f"({_SEQ_RULES[caps.name]})")
    return out


_SEQ_RULES: Mapping[str, str] = MappingProxyType({
    "torchtitan": "tp × 2 × cp: torchtitan distributed/parallel_dims.py:365-372, models/llama3/infra/parallelize.py:69-74",
    "megatron": "2 × cp with cp > 1: Megatron-LM megatron/training/arguments.py:1335-1338",
})


def _seq_divisor(caps: Capabilities, s: RunSettings) -> int:
    if caps.name == "torchtitan":
        return s.tp * 2 * s.cp
    if caps.name == "megatron" and s.cp > 1:
        return 2 * s.cp
    return 1


def _settings_problems(caps: Capabilities, s: RunSettings) -> list[str]:
    out = []
    if s.precision not in caps.precisions:
        out.append(f"{caps.name} trains in {', '.join(caps.precisions)}, not {s.precision} "
                   f"({caps.sources.get(s.precision, caps.sources.get('precision', caps.version))})")
    elif s.precision == "fp8" and s.resolved_fp8_recipe not in caps.fp8_recipes:
        out.append(f"{caps.name} fp8 recipes are {', '.join(caps.fp8_recipes)}, not {s.resolved_fp8_recipe} "
                   f"({caps.sources.get('fp8', '')}); give --fp8-recipe")
    if s.recompute_every > 1 and s.recompute not in caps.every_n:
        out.append(f"{caps.name} cannot recompute 1 layer in {s.recompute_every} with recompute {s.recompute}")
    if s.compile and not caps.compile:
        out.append(f"{caps.name} has no torch.compile switch in its configuration; drop --compile")
    if s.hybrid_shard and not caps.hybrid_shard:
        out.append(f"{caps.name} has no hybrid sharding in its configuration; drop --hybrid-shard")
    if s.param_dtype == "bf16" and not caps.param_dtype_bf16:
        out.append(f"{caps.name} has no pure-bf16 parameter setting; drop --param-dtype bf16")
    ft = s.finetune
    if ft.paged and caps.name != "hf":
        out.append(f"{caps.name} has no paged optimizer states (bitsandbytes PagedAdamW: --engine hf); drop paged")
    if ft.method not in caps.finetune or (caps.finetune == ("full",) and ft.frozen_layers):
        out.append(f"{caps.name} trains every parameter with its own optimizer (--finetune {ft.method}"
                   + (f", frozen-layers={ft.frozen_layers}" if ft.frozen_layers else "")
                   + (", paged" if ft.paged else "") + " is model code there); --engine hf states LoRA/QLoRA "
                   "(PEFT, bitsandbytes)")
    return out


def check_plan(caps: Capabilities, settings: RunSettings, *, dp: int, accum: int, seq_len: int, what: str) -> None:
    """Raise a one-line :class:`SpecError` (``what``: the flag or export at fault) when ``caps`` cannot run it."""
    problems = plan_problems(caps, settings, dp=dp, accum=accum, seq_len=seq_len)
    if problems:
        raise SpecError(f"{what}: {problems[0]}")


def _who(test: Callable[[Capabilities], bool]) -> str:
    names = [c.name for c in ENGINES.values() if test(c)]
    return f"engines that run it: {', '.join(names)}" if names else "no engine here runs it"


def request_problems(caps: Capabilities, settings: RunSettings, *, tp: int | None = None, pp: int | None = None,
                     vpp: int | None = None, cp: int | None = None, ep: int | None = None,
                     zero: int | None = None, recompute: str | None = None) -> list[str]:
    """What the user asked (settings flags and pins; None: searched) that ``caps`` cannot run, one line each
    naming the flag, the reason and the engines that do run it."""
    e = f"--engine {caps.name}"
    out: list[str] = []
    if tp is not None and tp > 1 and not caps.tp:
        out.append(f"{e} cannot run --tp {tp}: {caps.sources.get('tensor parallel', 'no tensor parallelism')}; "
                   f"{_who(lambda c: c.tp)}")
    if pp is not None and pp > 1 and not caps.pipeline_schedules:
        out.append(f"{e} has no pipeline parallelism (--pp {pp}); {_who(lambda c: bool(c.pipeline_schedules))}")
    if vpp is not None and vpp > 1 and "interleaved" not in caps.pipeline_schedules:
        out.append(f"{e} has no interleaved pipeline schedule (--vpp {vpp}); "
                   f"{_who(lambda c: 'interleaved' in c.pipeline_schedules)}")
    if cp is not None and cp > 1 and not caps.cp:
        out.append(f"{e} has no context parallelism in its configuration (--cp {cp}); {_who(lambda c: c.cp)}")
    if ep is not None and ep > 1 and not caps.ep:
        out.append(f"{e} has no expert parallelism in its configuration (--ep {ep}); {_who(lambda c: c.ep)}")
    model_parallel = any(x is not None and x > 1 for x in (tp, pp, cp, ep))
    out += _scheme_problems(caps, settings, zero=zero, recompute=recompute, model_parallel=model_parallel)
    out += [f"{e}: {p}" for p in _settings_problems(caps, settings)]
    if settings.sp and caps.sequence_parallel == "never":
        out.append(f"{e} has no sequence parallelism over tensor parallelism; drop --sp")
    return out


def _scheme_problems(caps: Capabilities, s: RunSettings, *, zero: int | None, recompute: str | None,
                     model_parallel: bool) -> list[str]:
    e = f"--engine {caps.name}"
    schemes = [x for x in caps.shardings if (zero is None or x.zero_stage == zero)]
    if not schemes:
        return [f"{e} runs {caps.describe_shardings()}, not --zero {zero}; {_who(lambda c: any(x.zero_stage == zero for x in c.shardings))}"]
    if model_parallel and all(x.alone_only for x in schemes):
        others = sorted({x.zero_stage for x in caps.shardings if not x.alone_only})
        return [f"{e} runs ZeRO-{zero} {schemes[0].name} only as the sole parallelism ({schemes[0].source}); with "
                f"--tp/--pp/--cp/--ep use --zero {' or '.join(map(str, others))}"]
    schemes = [x for x in schemes if not (model_parallel and x.alone_only)]
    if s.offload and not any(x.offload for x in schemes):
        return [f"{e} cannot keep optimizer states in CPU memory"
                + (f" with ZeRO-{zero}" if zero is not None else "") + f" (--offload); "
                f"{_who(lambda c: any(x.offload for x in c.shardings))}"]
    schemes = [x for x in schemes if x.offload or not s.offload]
    partial = s.finetune.method != "full" or bool(s.finetune.frozen_layers)
    if partial and s.finetune.method in caps.finetune and not any(x.finetune for x in schemes):
        able = ", ".join(f"ZeRO-{x.zero_stage} {x.name}" for x in caps.shardings if x.finetune)
        return [f"{e} cannot run --finetune {s.finetune.method}"
                + (f" with --zero {zero}" if zero is not None else "") + f": {able} only "
                f"({caps.sources.get('finetune', '')})"]
    schemes = [x for x in schemes if x.finetune or not partial]
    if not any(s.optimizer in x.optimizers for x in schemes):
        return [f"{e} selects no --optimizer {s.optimizer} here ({caps.sources.get('optimizer', '')}); "
                f"{_who(lambda c: any(s.optimizer in x.optimizers for x in c.shardings))}"]
    if recompute is not None:
        allowed = {r for x in schemes for r in (*x.recompute, *(x.pipeline_recompute or ()))}
        if recompute not in allowed:
            return [f"{e} does not switch on --recompute {recompute} from its configuration "
                    f"({caps.sources.get('recompute', 'no such setting')}); "
                    f"{_who(lambda c: any(recompute in (*x.recompute, *(x.pipeline_recompute or ())) for x in c.shardings))}"]
    return []
