"""The plan's layout and policies applied to the model, in torchtitan's order.

Examples::

    batchpilot train --nproc 2 --zero 3 --recompute op             # FSDP2, torchtitan's per-op checkpointing
    batchpilot train --nproc 2 --zero 2 --recompute full --recompute-every 2
    batchpilot train --nproc 2 --zero 3 --tp 2 --compile          # 2-D mesh (dp 1 × tp 2), compiled blocks

:func:`parallelize` follows ``parallelize_llama`` (``torchtitan/models/llama3/parallelize.py`` @ ``b5bcd76c``):

1. *fp8* (``--precision fp8``, CUDA only): torchao ``convert_to_float8_training`` of every linear but the
   output head, as torchtitan's ``quantize.linear.float8`` converter does before parallelising.
2. *Tensor parallelism* (``--tp``): inside each decoder layer the model's own ``base_model_tp_plan``
   (``transformers``: q/k/v and gate/up ``colwise``, o/down ``rowwise``) as torch
   ``ColwiseParallel``/``RowwiseParallel`` on the ``tp`` dimension of a ``(dp, tp)`` device mesh; around
   them torchtitan's ``apply_tp`` (``torchtitan/models/llama3/infra/parallelize.py`` @ ``73a0e69``) without
   sequence parallelism: the embedding ``RowwiseParallel`` (vocabulary rows split, output replicated), the
   output head ``ColwiseParallel`` with vocabulary-sharded logits and the loss under ``loss_parallel()``
   (torchtitan's default with TP; :func:`loss_context`), the norms replicated. No sequence parallelism: the
   planner plans this runner's TP without ``--sp``.
3. *Recomputation* (``--recompute op|full``, ``--recompute-every N``): each checkpointed decoder layer is
   wrapped in ``checkpoint_wrapper`` (non-reentrant ``torch.utils.checkpoint``) as torchtitan's
   ``FullAC``/``SelectiveAC._wrap_block`` do (``torchtitan/distributed/activation_checkpoint.py`` @
   ``b5bcd76c``), *before* FSDP2, with the one policy implementation of :mod:`batchpilot.measure.recompute`
   (which layers: :func:`~batchpilot.measure.recompute.checkpointed`; which ops are saved:
   :func:`~batchpilot.measure.recompute.checkpoint_kwargs`) — the policies the memory model counts and the
   probe and the traced estimate apply. torch's default ``early_stop=True`` is kept (torchtitan passes
   False): the recomputation stops once backward has what it needs, as the memory model counts it.
4. *Compile* (``--compile``): ``block.compile()`` of every decoder layer (wrapped or not), after
   recomputation and before FSDP2 (torchtitan ``apply_compile``).
5. *Data parallelism*: FSDP2 ``fully_shard`` on the ``dp`` dimension (``--zero 3``: the embedding and each
   block resharded after forward, the ``[norm, lm_head]`` unit kept — torchtitan's ``default``
   ``reshard_after_forward`` policy of ``apply_fsdp_to_decoder``, ``torchtitan/distributed/fsdp.py`` @
   ``b5bcd76c``; ``last``, ``always``, ``never`` as ``--reshard-after-forward`` says; ``--zero 2``: no unit
   reshards), with ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` under ``--precision bf16``
   (torchtitan's ``mixed_precision_param``/``mixed_precision_reduce`` defaults): the all-gathers move bf16 and
   the reduce-scatters fp32, and the forward runs without autocast (fp16: the same with fp16 parameters and
   ``ShardedGradScaler``; torchtitan has no fp16). Gloo reduce-scatters bf16 too (checked
   with torch 2.13, 2 ranks on CPU), so CPU runs use the same policy as NCCL runs. Or DDP (``--zero 0``).

Sharded runs (FSDP2 or TP) build the model on the meta device on every rank; after sharding,
``to_empty`` allocates only this rank's shards and :func:`load_full_weights` fills them from the full
weights that rank 0 alone built, with ``set_model_state_dict(..., full_state_dict=True,
broadcast_from_rank0=True)`` (torchtitan's seed-checkpoint loading; non-persistent buffers such as RoPE's
``inv_freq`` are broadcast from rank 0 too). Rank 0 holds the full fp32 model once; every other rank
never holds more than its shards plus one tensor in flight.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from batchpilot.errors import BatchpilotError
from batchpilot.train.config import TrainConfig
from batchpilot.train.distributed import DistEnv, LaunchError

TP_STYLES = ("colwise", "rowwise")
"""``base_model_tp_plan`` entries the runner applies (torch ``ColwiseParallel`` / ``RowwiseParallel``)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ParallelLayout:
    """This process's coordinates on the ``(dp, tp)`` mesh: tp is the inner dimension (torchtitan's order),
    so ranks ``tp·k … tp·k + tp − 1`` form one tensor-parallel group and read the same data."""

    rank: int
    world_size: int
    tp: int

    def __post_init__(self) -> None:
        if self.tp < 1 or self.world_size % self.tp:
            raise LaunchError(f"--tp {self.tp} does not divide the {self.world_size} processes; launch a multiple of "
                              f"{self.tp} processes or use a --tp that divides {self.world_size}")

    @property
    def dp(self) -> int:
        """Data-parallel ranks (world / tp): the ``dp`` of ``global = micro × accum × dp``."""
        return self.world_size // self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp


def ensure_process_group(env: DistEnv) -> None:
    """FSDP2 and DTensor need a process group, also of one process (an in-memory store)."""
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo" if env.device.type == "cpu" else "nccl",
                                store=dist.HashStore(), rank=0, world_size=1)


def device_mesh(env: DistEnv, layout: ParallelLayout) -> Any:
    """The ``(dp, tp)`` ``DeviceMesh`` over every rank."""
    from torch.distributed.device_mesh import init_device_mesh

    ensure_process_group(env)
    return init_device_mesh(env.device.type, (layout.dp, layout.tp), mesh_dim_names=("dp", "tp"))


def decoder_layers(module: nn.Module) -> nn.ModuleList:
    """The decoder layers of a ``transformers`` causal LM (``model.layers``)."""
    base = getattr(module, "model", None) or getattr(module, "base_model", module)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise BatchpilotError(f"{type(module).__name__} has no model.layers list of decoder layers; the runner's "
                              f"FSDP2, tensor parallelism, recomputation and compile need a decoder-only model "
                              f"(Llama, Mistral, Qwen2 shapes)")
    return layers


def _base(module: nn.Module) -> nn.Module:
    return getattr(module, "model", None) or module


# ---------------------------------------------------------------------------------------------- fp8
def apply_fp8(module: nn.Module, recipe: str, device: torch.device) -> None:
    """torchao float8 training of every ``nn.Linear`` but the output head (CUDA only)."""
    if device.type != "cuda":
        raise BatchpilotError(f"--precision fp8 runs torchao Float8Linear matmuls, which need a CUDA GPU with fp8 "
                              f"units (compute capability 8.9+); this run is on {device.type}: use --precision "
                              f"bf16 here (memory and plan still model fp8)")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise BatchpilotError("--precision fp8 needs torchao: pip install torchao") from None
    config = Float8LinearConfig.from_recipe_name(recipe)
    convert_to_float8_training(module, config=config, module_filter_fn=lambda m, fqn: fqn != "lm_head")


# ---------------------------------------------------------------------------------------------- tensor parallel
def tp_plan(module: nn.Module) -> dict[str, str]:
    """``layer-relative name → colwise|rowwise`` from the config's ``base_model_tp_plan``."""
    plan = dict(getattr(module.config, "base_model_tp_plan", None) or {})
    if not plan:
        raise BatchpilotError(f"{type(module).__name__} has no base_model_tp_plan in its transformers config; "
                              f"--tp needs one (Llama, Mistral, Qwen2 have it); use --tp 1")
    out = {}
    for pattern, style in plan.items():
        if not pattern.startswith("layers.*.") or style not in TP_STYLES:
            raise BatchpilotError(f"tensor-parallel plan entry {pattern!r}: {style!r} is not applied by the runner "
                                  f"(it applies {', '.join(TP_STYLES)} inside decoder layers); use --tp 1")
        out[pattern.removeprefix("layers.*.")] = style
    return out


def check_tp(module: nn.Module, tp: int) -> None:
    """One line when ``tp`` does not split the heads, key/value heads and MLP width evenly."""
    cfg: Any = module.config
    heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
    sizes = {"attention heads": heads, "key/value heads": int(getattr(cfg, "num_key_value_heads", 0) or heads),
             "MLP width": int(getattr(cfg, "intermediate_size", 0) or 0)}
    for what, size in sizes.items():
        if size % tp:
            raise BatchpilotError(f"--tp {tp} does not divide the model's {size} {what}; use a --tp that divides it")


def apply_tp(module: nn.Module, tp_mesh: Any) -> None:
    """Colwise/rowwise DTensor sharding of each decoder layer's linears (outputs back as local tensors), the
    embedding split by vocabulary rows, the output head by vocabulary columns (logits stay sharded)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if getattr(module.config, "tie_word_embeddings", False):
        raise BatchpilotError("--tp with tied input and output embeddings is not run here (the embedding is split "
                              "by rows, the head by vocabulary columns); use --tp 1 or a model with untied embeddings")
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    plan = {name: styles[style]() for name, style in tp_plan(module).items()}
    for layer in decoder_layers(module):
        parallelize_module(layer, tp_mesh, plan)
    ends = {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
            "lm_head": ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False)}
    parallelize_module(module, tp_mesh, {k: v for k, v in ends.items() if _has(module, k)})


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def loss_context(tp: int) -> Any:
    """``loss_parallel()`` with tensor parallelism (the logits are vocabulary shards; forward and backward of
    the loss run inside it, as torchtitan's train step does), else nothing."""
    if tp == 1:
        return contextlib.nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel()


def local_value(tensor: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor's value as a plain tensor (the loss under ``loss_parallel``); others unchanged."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


# ---------------------------------------------------------------------------------------------- recompute, compile
def apply_recompute(module: nn.Module, recompute: str, every: int) -> int:
    """Wrap the checkpointed decoder layers in ``checkpoint_wrapper`` with the shared policy; returns how many."""
    if recompute == "none":
        return 0
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from batchpilot.measure.recompute import checkpoint_kwargs, checkpointed
    from batchpilot.specs.settings import check_recompute_every

    layers = decoder_layers(module)
    check_recompute_every(every, len(layers))
    # A K/V cache mutated in forward would make the recomputation differ (transformers' own checkpointing
    # turns it off the same way: "use_cache=True is incompatible with gradient checkpointing").
    config: Any = module.config
    config.use_cache = False
    kwargs = checkpoint_kwargs(recompute)
    kwargs.pop("use_reentrant", None)  # checkpoint_wrapper's NO_REENTRANT implementation sets it
    count = 0
    for index, layer in enumerate(list(layers)):
        if checkpointed(index, every):
            layers[index] = checkpoint_wrapper(layer, **kwargs)
            count += 1
    return count


def apply_compile(module: nn.Module) -> None:
    """``torch.compile`` every decoder layer in place (its checkpoint wrapper included)."""
    import torch._dynamo

    # RoPE/mask side effects are not replayed in a compiled recompute (torchtitan apply_compile sets the same)
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True  # type: ignore[attr-defined]
    for layer in decoder_layers(module):
        layer.compile()


# ---------------------------------------------------------------------------------------------- data parallel
def mixed_precision(precision: str) -> Any:
    """FSDP2's policy: 16-bit parameters (bf16 for bf16/fp8, fp16 for fp16 with ``ShardedGradScaler``) and fp32
    reduction; none (fp32 throughout) for fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision in ("bf16", "fp8", "fp16"):
        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    return MixedPrecisionPolicy()


def _units(module: nn.Module, zero: int, policy: str) -> Iterator[tuple[nn.Module | list[nn.Module], bool]]:
    """(FSDP unit, reshard_after_forward) in torchtitan's ``apply_fsdp_to_decoder`` order, root excluded."""
    base, layers = _base(module), decoder_layers(module)
    always, full = policy == "always", zero == 3
    embed, norm, head = (getattr(base, "embed_tokens", None), getattr(base, "norm", None),
                         getattr(module, "lm_head", None))
    ends = [m for m in (norm, head) if isinstance(m, nn.Module)]
    tied = bool(getattr(module.config, "tie_word_embeddings", False))
    if policy != "last":
        if tied and embed is not None:
            yield [embed, *ends], full and always
        else:
            if embed is not None:
                yield embed, full and policy != "never"
            if ends:
                yield ends, full and always
    last = len(layers) - 1
    for index, layer in enumerate(layers):
        reshard = full and policy != "never" and (policy != "last" or index < last)
        yield layer, reshard


def apply_fsdp(module: nn.Module, dp_mesh: Any, *, zero: int, policy: str, precision: str) -> None:
    """``fully_shard`` the units of :func:`_units`, then the root (which reshards nothing, torch's default)."""
    from torch.distributed.fsdp import fully_shard

    mp = mixed_precision(precision)
    for unit, reshard in _units(module, zero, policy):
        fully_shard(unit, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp)
    fully_shard(module, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False if zero == 2 else None)


def apply_ddp(module: nn.Module, env: DistEnv) -> nn.Module:
    """torch DDP; buffers (RoPE ``inv_freq``) are identical on every rank, so none is broadcast per forward."""
    if not env.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


def sharded(config: TrainConfig) -> bool:
    """Whether the model is sharded (FSDP2 or TP) and therefore built on the meta device."""
    return config.fsdp or config.parallel.tp > 1


def parallelize(module: nn.Module, config: TrainConfig, env: DistEnv, mesh: Any) -> nn.Module:
    """Apply fp8 → TP → recomputation → compile → FSDP2 or DDP (see the module docstring); returns the model
    to train (a DDP wrapper, or ``module`` itself modified in place)."""
    p, precision = config.parallel, config.optim.precision
    if precision == "fp8":
        apply_fp8(module, p.fp8_recipe, env.device)
    if p.tp > 1:
        check_tp(module, p.tp)
        apply_tp(module, mesh["tp"])
    apply_recompute(module, p.recompute, p.recompute_every)
    if p.compile:
        apply_compile(module)
    if config.fsdp:
        apply_fsdp(module, mesh["dp"], zero=config.zero_stage, policy=p.reshard_after_forward, precision=precision)
        return module
    if p.tp > 1:
        return module
    return apply_ddp(module, env)


def load_full_weights(model: nn.Module, full: nn.Module | None, env: DistEnv) -> None:
    """Fill a sharded model allocated with ``to_empty`` from ``full`` (rank 0's complete model; None elsewhere):
    parameters and persistent buffers through ``set_model_state_dict(broadcast_from_rank0=True)``, then every
    buffer broadcast from rank 0 (non-persistent ones, such as RoPE's ``inv_freq``, are in no state dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state = full.state_dict() if full is not None else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    sources = dict(full.named_buffers()) if full is not None else {}
    for name, buffer in _named_buffers(model):
        if env.is_main:
            buffer.copy_(sources[name])
        if env.distributed:
            dist.broadcast(buffer, src=0)


def _named_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Buffers by their name in the unwrapped model (checkpoint/compile wrappers' prefixes removed)."""
    out = []
    for name, buffer in model.named_buffers():
        clean = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
        out.append((clean, buffer))
    return out

