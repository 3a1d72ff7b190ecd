"""Run settings: how a model is trained, as far as memory and step time depend on it.

One frozen, validated dataclass shared by ``memory``, ``plan``, ``probe`` and ``tune``. The CLI flags
map one-to-one: ``--precision --optimizer --engine --zero --tp --pp --vpp --cp --ep --sp --recompute
--recompute-every --attention --compile --fp8-recipe --fp8-all-gather --reshard-after-forward --loss
--param-dtype --offload --finetune``. Validation against a *model* (tp divides heads, pp ≤ layers, ...) is
:func:`validate_for_model`; against a cluster, the planner's job.

How each engine names these settings (the README's "Settings and how engines name them" has the table):
torchtitan ``activation_checkpoint.mode``/``selective_ac_option``, ``parallelism.*``,
``training.compile``, ``float8.*``/``mx.*`` (``torchtitan/config_manager.py`` @ ``e7c0cae9``); Megatron-LM
``--recompute-granularity``/``--recompute-method``/``--recompute-num-layers``,
``--context-parallel-size``, ``--fp8-format``/``--fp8-recipe`` (``megatron/training/arguments.py`` @
``d98e8a64``); Hugging Face ``gradient_checkpointing`` (every layer, ``every_n_layers``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

from batchpilot.errors import SpecError
from batchpilot.specs.finetune import FULL, FineTune

if TYPE_CHECKING:
    from batchpilot.specs.model import ModelSpec

Precision = Literal["fp32", "bf16", "fp16", "fp8"]
Optimizer = Literal["adamw", "adamw-8bit", "sgd-momentum", "adafactor"]
Engine = Literal["torch", "fsdp2", "deepspeed", "megatron"]
Recompute = Literal["none", "selective", "op", "full"]
Attention = Literal["eager", "flash"]
FP8Recipe = Literal["tensorwise", "rowwise", "delayed", "mxfp8", "blockwise"]
Reshard = Literal["default", "last", "always", "never"]
Loss = Literal["auto", "eager", "compiled", "parallel", "fused", "chunked"]
ParamDtype = Literal["fp32", "bf16"]

PRECISIONS: tuple[str, ...] = get_args(Precision)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
ENGINES: tuple[str, ...] = get_args(Engine)
RECOMPUTES: tuple[str, ...] = get_args(Recompute)
ATTENTIONS: tuple[str, ...] = get_args(Attention)
FP8_RECIPES: tuple[str, ...] = get_args(FP8Recipe)
RESHARDS: tuple[str, ...] = get_args(Reshard)
LOSSES: tuple[str, ...] = get_args(Loss)
PARAM_DTYPES: tuple[str, ...] = get_args(ParamDtype)

#: The fp8 recipe each engine uses when ``--fp8-recipe`` is not given: torchao's ``Float8Linear`` default
#: (dynamic tensorwise scaling; ``torchao/float8/config.py``) for torch/fsdp2/deepspeed, Transformer
#: Engine's ``DelayedScaling`` for Megatron-LM (``--fp8-recipe`` default ``delayed``,
#: ``megatron/training/arguments.py`` @ ``d98e8a64``).
DEFAULT_FP8_RECIPE: dict[str, str] = {"torch": "tensorwise", "fsdp2": "tensorwise", "deepspeed": "tensorwise",
                                      "megatron": "delayed"}


@dataclass(frozen=True, kw_only=True, slots=True)
class RunSettings:
    """Training settings that change memory and step time."""

    precision: Precision = "bf16"
    """Compute precision. ``fp32``: no autocast. ``bf16``/``fp16``: mixed precision (fp16 adds a loss
    scaler). ``fp8``: fp8 matmuls (Transformer-Engine style) with bf16 weights/activations elsewhere."""
    optimizer: Optimizer = "adamw"
    engine: Engine = "torch"
    """Whose mixed-precision bookkeeping to model: ``torch`` autocast keeps fp32 weights and grads;
    ``fsdp2`` (MixedPrecisionPolicy: fp32 sharded params, bf16 unsharded compute copies);
    ``deepspeed`` 2 + 2 + 12 bytes/param; ``megatron`` fp32 main grads (2 + 4 + 12)."""
    zero_stage: int = 0
    """0 plain data parallel; 1 optimizer states sharded; 2 + gradients; 3 + parameters (FSDP full
    shard). For ``megatron``, ≥ 1 means its distributed optimizer."""
    hybrid_shard: bool = False
    """Shard within a node and replicate across nodes (FSDP HYBRID_SHARD / ZeRO++ hpZ)."""
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size (stages)."""
    vpp: int = 1
    """Virtual pipeline stages per pipeline rank: the interleaved 1F1B schedule (Narayanan et al. 2021
    §2.2.2; Megatron ``--num-virtual-stages-per-pipeline-rank``) splits each rank's layers into ``vpp``
    chunks, dividing the pipeline bubble by ``vpp`` at the price of ``vpp``× the stage-to-stage sends and
    a little more first-stage activation memory. 1 is plain 1F1B; > 1 needs ``pp`` > 1 and an
    accumulation that is a multiple of ``pp`` (:func:`check_interleaving`)."""
    ep: int = 1
    """Expert-parallel size (MoE only): routed experts are split over ``ep`` data-parallel ranks."""
    sp: bool = False
    """Megatron-style sequence parallelism over the tensor-parallel group (needs ``tp`` > 1 to matter)."""
    cp: int = 1
    """Context-parallel size: each sequence is split over ``cp`` GPUs (ring attention), so every per-token
    activation term counts ``micro_batch × seq_len / cp`` tokens; the gathered K/V of the ring are a
    per-layer transient. Parameters and optimizer states are sharded over ``dp × cp`` (torchtitan's
    ``dp_shard_cp`` mesh; Megatron's data-parallel-with-CP group)."""
    recompute: Recompute = "none"
    """Activation recomputation of the checkpointed layers. ``selective``: Megatron-LM's
    ``--recompute-granularity selective`` (the attention core only; Korthikanti et al. 2022 §4: drops the
    s×s terms, nearly nothing under flash attention). ``op``: torchtitan's per-op selective checkpointing
    (``selective_ac_option = "op"``): the outputs of matmuls, attention kernels and collectives are saved,
    except every second ``mm`` of a layer; everything else recomputed. ``full``: the layer keeps only its
    input."""
    recompute_every: int = 1
    """Checkpoint 1 layer in N (layers N, 2N, … of each pipeline stage); the others keep everything (no effect
    with ``recompute="none"``).
    torchtitan: integer ``selective_ac_option = N`` with ``mode = "selective"`` (the checkpointed layers are
    full-AC); Megatron-LM: ``--recompute-method block --recompute-num-layers L/N`` (the first layers of a
    stage instead of every N-th); Hugging Face: ``activation_checkpointing_enable(every_n_layers=N)``."""
    attention: Attention = "flash"
    """``eager`` materialises the s×s score matrix; ``flash`` (FlashAttention / SDPA) does not."""
    compile: bool = False
    """``torch.compile`` of each transformer block (torchtitan ``training.compile``; inductor): its
    min-cut partitioner saves only what backward needs and fuses elementwise ops, so fewer and smaller
    tensors are saved and the forward transients shrink; with ``--loss auto`` the loss is compiled too."""
    fp8_recipe: FP8Recipe | None = None
    """Scaling recipe for ``--precision fp8``; None: the engine's default (:data:`DEFAULT_FP8_RECIPE`).
    ``tensorwise``: one scale per tensor computed from the current amax (torchao ``Float8Linear``
    default, TE ``Float8CurrentScaling``, Megatron ``--fp8-recipe tensorwise``); ``rowwise``: torchao's
    per-row scales; ``delayed``: TE ``DelayedScaling`` (scales from an amax history); ``mxfp8``: 32-element
    block scales (MX; torchao ``MXLinear``, TE ``MXFP8BlockScaling``, Blackwell); ``blockwise``: TE
    ``Float8BlockScaling`` (128-element blocks, DeepSeek-V3 style). Under torchao the saved activations stay
    bf16; under Transformer Engine (``--engine megatron``) the norm outputs and the second matmul inputs are
    saved in fp8 and each linear weight keeps a cached fp8 copy."""
    fp8_all_gather: bool = False
    """FSDP2 all-gathers the weights in fp8 (torchtitan ``float8.enable_fsdp_float8_all_gather``): the
    unsharded block weights take 1 byte per parameter instead of 2. Needs fsdp2, fp8 and tensorwise scaling."""
    reshard_after_forward: Reshard = "default"
    """FSDP2 (``--engine fsdp2 --zero 3``) ``fully_shard(reshard_after_forward=...)`` policy, torchtitan's
    ``parallelism.fsdp_reshard_after_forward``. ``default`` (torchtitan since ``83e69410``, 2025-07-28,
    ``apply_fsdp``): the embedding and every block are resharded after forward, the ``[norm, output]`` unit
    is not. ``last`` (torchtitan's default before that, e.g. ``9dec370a`` and ``e7c0cae9``): every block but
    the last is resharded, and the root unit (embedding, final norm, output) stays unsharded (torch keeps
    the root unit). ``always``: every unit. ``never``: no unit (as ``--zero 2``). With pipeline
    parallelism torchtitan reshards nothing whatever the policy."""
    loss: Loss = "auto"
    """The cross-entropy path. ``eager``: ``cross_entropy(logits.float())`` (Hugging Face, torchtitan before
    2025-04, torchtune): fp32 log-softmax and two fp32 vocabulary-wide gradients; ``compiled``: the same
    under ``torch.compile`` (fused: the bf16 logits and their gradient); ``parallel``: PyTorch
    ``loss_parallel()`` over the tensor-parallel vocabulary shards; ``fused``: Megatron-LM's
    vocab-parallel cross entropy (fp32 exp-logits computed and differentiated in place); ``chunked``:
    torchtune's ``CEWithChunkedOutputLoss`` (the output projection and the fp32 upcast per chunk of
    ``loss_chunks``). ``auto``: Megatron → fused, fsdp2 with tp > 1 → parallel (torchtitan's default),
    ``--compile`` → compiled, else eager."""
    loss_chunks: int = 8
    """Chunks of the ``chunked`` loss (torchtune's ``num_output_chunks`` default 8)."""
    param_dtype: ParamDtype = "fp32"
    """Dtype of the stored parameters. ``fp32``: mixed precision (fp32 master weights, 16-bit compute);
    ``bf16``: pure bf16 training (weights, gradients and optimizer states in bf16: torchtune's
    ``dtype: bf16``, torchtitan's ``training.dtype = "bfloat16"``). Needs ``--precision bf16``."""
    offload: bool = False
    """Optimizer states (and fp32 master weights) live in CPU memory (ZeRO-Offload)."""
    finetune: FineTune = FULL
    """What trains: full training, LoRA, QLoRA, frozen layers (``--finetune``; :mod:`batchpilot.specs.finetune`)."""

    def __post_init__(self) -> None:
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("engine", self.engine, ENGINES)
        _check_choice("recompute", self.recompute, RECOMPUTES)
        _check_choice("attention", self.attention, ATTENTIONS)
        _check_choice("reshard_after_forward", self.reshard_after_forward, RESHARDS)
        _check_choice("loss", self.loss, LOSSES)
        _check_choice("param_dtype", self.param_dtype, PARAM_DTYPES)
        if self.fp8_recipe is not None:
            _check_choice("fp8_recipe", self.fp8_recipe, FP8_RECIPES)
        if isinstance(self.zero_stage, bool) or self.zero_stage not in (0, 1, 2, 3):
            raise SpecError(f"--zero {self.zero_stage!r} is not a ZeRO stage; use 0, 1, 2 or 3")
        meaning = {"recompute_every": "1 checkpoints every layer", "loss_chunks": "1 is one chunk"}
        for name in ("tp", "pp", "vpp", "ep", "cp", "recompute_every", "loss_chunks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError(f"--{name.replace('_', '-')} {value!r} must be a positive integer "
                                f"({meaning.get(name, '1 disables it')})")
        for name in ("compile", "fp8_all_gather", "sp", "hybrid_shard", "offload"):
            if not isinstance(getattr(self, name), bool):
                raise SpecError(f"--{name.replace('_', '-')} {getattr(self, name)!r} must be true or false")
        self._check_combinations()
        if self.vpp > 1 and self.pp == 1:
            raise SpecError(f"--vpp {self.vpp} interleaves pipeline stages and needs --pp > 1; use --vpp 1 without a pipeline")
        if self.offload and self.zero_stage == 0 and self.engine in ("deepspeed", "fsdp2"):
            raise SpecError("--offload needs --zero 1, 2 or 3 with the deepspeed/fsdp2 engines (ZeRO-Offload)")

    def _check_combinations(self) -> None:
        """Settings that cannot go together (one-line errors naming the fix). Settings that merely have no
        effect in a combination (a planner varies the layout around them) are :func:`check_effective`'s."""
        if self.fp8_recipe is not None and self.precision != "fp8":
            raise SpecError(f"--fp8-recipe {self.fp8_recipe} needs --precision fp8 (got {self.precision})")
        if self.fp8_all_gather and (self.precision != "fp8" or self.resolved_fp8_recipe != "tensorwise"):
            raise SpecError("--fp8-all-gather needs --engine fsdp2 --precision fp8 with tensorwise scaling "
                            "(torchao all-gathers Float8 weights only for tensorwise); drop it or change those")
        if self.param_dtype == "bf16" and self.precision != "bf16":
            raise SpecError(f"--param-dtype bf16 (pure bf16 training) needs --precision bf16, got {self.precision}")
        if self.cp > 1 and self.attention == "eager":
            raise SpecError(f"--cp {self.cp} runs ring attention over SDPA/flash kernels; use --attention flash")
        self.finetune.check_settings(precision=self.precision, param_dtype=self.param_dtype, optimizer=self.optimizer)
        if self.compile and self.engine == "megatron":
            raise SpecError("--compile: Megatron-LM does not torch.compile its model (it fuses with TE and "
                            "Apex kernels); drop --compile or use --engine fsdp2 or torch")

    @property
    def resolved_fp8_recipe(self) -> str | None:
        """The fp8 recipe in use: ``fp8_recipe``, else the engine's default (None unless ``precision`` is fp8)."""
        if self.precision != "fp8":
            return None
        return self.fp8_recipe or DEFAULT_FP8_RECIPE[self.engine]

    @property
    def resolved_loss(self) -> str:
        """The loss path in use (``loss``, with ``auto`` resolved as its docstring says)."""
        if self.loss != "auto":
            return self.loss
        if self.engine == "megatron":
            return "fused"
        if self.engine == "fsdp2" and self.tp > 1:
            return "parallel"
        return "compiled" if self.compile else "eager"

    @property
    def model_parallel_size(self) -> int:
        """GPUs that hold one model replica: tp × pp × cp (experts are spread over data-parallel ranks)."""
        return self.tp * self.pp * self.cp

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SpecError(f"--{name.replace('_', '-')} {value!r} is not one of: {', '.join(choices)}")


def check_effective(settings: RunSettings) -> None:
    """Raise a one-line :class:`SpecError` for a setting given where it has no effect (for a user's explicit
    settings; a planner that varies the engine, ZeRO stage and recomputation around them does not call this:
    FSDP2's options are ignored under other engines, 1-in-N checkpointing without recomputation)."""
    if settings.fp8_all_gather and settings.engine != "fsdp2":
        raise SpecError("--fp8-all-gather needs --engine fsdp2 --precision fp8 with tensorwise scaling (FSDP2 "
                        f"all-gathers the weights; --engine {settings.engine} does not)")
    if settings.reshard_after_forward != "default" and settings.engine != "fsdp2":
        raise SpecError(f"--reshard-after-forward {settings.reshard_after_forward} is FSDP2's policy; use it with "
                        f"--engine fsdp2 --zero 3")
    if settings.recompute_every > 1 and settings.recompute == "none":
        raise SpecError(f"--recompute-every {settings.recompute_every} checkpoints 1 layer in "
                        f"{settings.recompute_every} and needs --recompute op, selective or full")
    if settings.reshard_after_forward != "default" and settings.zero_stage != 3:
        raise SpecError(f"--reshard-after-forward {settings.reshard_after_forward} applies to FSDP2 full sharding "
                        f"(--engine fsdp2 --zero 3); --zero {settings.zero_stage} never reshards")


def check_recompute_every(every: int, layers: int, *, of: str = "") -> None:
    """Refuse checkpointing 1 layer in ``every`` when there are fewer ``layers``: nothing would be checkpointed
    (``of`` names them in the message)."""
    if every > layers:
        what = of or f"the model's {layers} layers"
        raise SpecError(f"--recompute-every {every} exceeds {what} (no layer would be checkpointed); use "
                        f"--recompute-every ≤ {layers}")


def validate_for_model(settings: RunSettings, model: ModelSpec) -> None:
    """Raise a one-line :class:`SpecError` when the parallel layout cannot split this model."""
    if model.num_heads % settings.tp:
        raise SpecError(
            f"--tp {settings.tp} does not divide the {model.num_heads} attention heads of {model.name}; "
            f"use a divisor of {model.num_heads}"
        )
    if model.family != "mla" and settings.tp > model.num_kv_heads and settings.tp % model.num_kv_heads:
        raise SpecError(
            f"--tp {settings.tp} must divide or be a multiple of the {model.num_kv_heads} key/value heads "
            f"of {model.name}; use a divisor of {model.num_kv_heads}"
        )
    if settings.pp > model.num_layers:
        raise SpecError(
            f"--pp {settings.pp} exceeds the {model.num_layers} layers of {model.name}; use --pp ≤ {model.num_layers}"
        )
    layers_per_stage = -(-model.num_layers // settings.pp)
    if settings.vpp > layers_per_stage:
        raise SpecError(
            f"--vpp {settings.vpp} exceeds the {layers_per_stage} layers per pipeline stage of {model.name} at --pp "
            f"{settings.pp} (each virtual stage needs a layer); use --vpp ≤ {layers_per_stage}"
        )
    if settings.recompute != "none":
        check_recompute_every(settings.recompute_every, model.num_layers, of=f"the {model.num_layers} layers of "
                                                                            f"{model.name}")
    if settings.ep > 1 and not model.is_moe:
        raise SpecError(f"--ep {settings.ep} needs a mixture-of-experts model; {model.name} is dense (use --ep 1)")
    if model.is_moe and model.num_experts % settings.ep:
        raise SpecError(
            f"--ep {settings.ep} does not divide the {model.num_experts} experts of {model.name}; "
            f"use a divisor of {model.num_experts}"
        )


def check_interleaving(settings: RunSettings, grad_accum: int) -> None:
    """The interleaved schedule needs the micro-batches per step to be a multiple of the pipeline stages
    (Megatron ``schedules.py``: micro-batches run in groups of ``pp`` per virtual stage, and a partial last
    group is refused as a dependency bubble)."""
    if settings.vpp > 1 and grad_accum % settings.pp:
        raise SpecError(
            f"--vpp {settings.vpp} (interleaved pipeline) needs an accumulation that is a multiple of --pp "
            f"{settings.pp}, got {grad_accum}; use --grad-accum {(grad_accum // settings.pp + 1) * settings.pp} or --vpp 1"
        )
