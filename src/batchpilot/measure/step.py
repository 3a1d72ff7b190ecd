"""One training step: the model, optimizer, autocast, loss and recomputation that batchpilot runs everywhere.

Example (CPU, seconds)::

    >>> from batchpilot.measure.step import StepConfig, build_step
    >>> from batchpilot.specs.model import load_model
    >>> step = build_step(load_model("tiny-llama-1m").hf_config, StepConfig(precision="bf16"),
    ...                   micro_batch=2, seq_len=32)
    >>> step.run()  # forward under autocast, fp32 token-sum loss / N, backward, clip, fused AdamW step
    >>> type(step.optimizer).__name__, step.optimizer.defaults["fused"]
    ('AdamW', True)

Every part that runs or counts a training step builds it here: the probe's trials
(:mod:`batchpilot.measure._trial`), the traced estimate (:mod:`batchpilot.measure.traced`, the same
code under fake tensors), the CPU allocator measurement (:mod:`batchpilot.measure.cpu_peak`), the
memory benchmarks (``benchmarks/cpu_step.py``) and the trainer (:mod:`batchpilot.train.loop`,
:mod:`batchpilot.train.model`). So a size the probe calls "fits" is a size whose step is the
trainer's step, and an estimate is checked against the step that is trained.

The step, part by part:

- *Model* (:func:`build_module`): ``AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_config))``
  in fp32 (the master weights) under ``torch.manual_seed(seed)``, or an ``nn.Module`` handed in (the
  trainer's pretrained or run-folder weights). Attention: batchpilot's ``flash`` is ``transformers``'
  ``sdpa`` (on CPU ``_scaled_dot_product_flash_attention_for_cpu``), ``eager`` materialises the scores.
- *Recomputation* (:func:`enable_recompute`): Hugging Face activation checkpointing of the decoder layers
  (non-reentrant ``torch.utils.checkpoint``): ``full`` and torchtitan's per-op ``op``, 1 layer in
  ``recompute_every`` (:mod:`batchpilot.measure.recompute`), or ``selective`` with a selective
  activation-checkpoint policy (:func:`selective_policy`); ``compile_layers`` compiles each layer.
- *Autocast* (:func:`autocast`): ``bf16``/``fp16`` run the forward under ``torch.autocast`` of that dtype
  on the module's device type; weights, gradients and optimizer states stay fp32. ``fp16`` scales the
  loss as ``torch.amp.GradScaler`` does (the trainer uses GradScaler itself; :class:`LossScale` for
  measured and traced steps, which cannot skip a step on a value).
- *Loss* (:func:`cross_entropy_sum`): the sum over target tokens of −log p in fp32 (``logits.float()``),
  back-propagated × ``world / N`` with ``N`` the target tokens of the whole global batch — the trainer's
  normalisation that makes accumulation numerically the large batch (:mod:`batchpilot.train.loop`). A
  single micro-batch step: ``N`` = its own target tokens.
- *Optimizer* (:func:`make_optimizer`): ``torch.optim.AdamW`` with the trainer's parameter groups (weight
  decay on matrices only, :func:`param_groups`), or SGD with momentum; its implementation is
  :func:`optimizer_implementation` — fused on CPU and CUDA unless the parameters are FSDP2 shards
  (DTensors take the ``foreach`` path), the one place this rule lives.
- *Clipping*: ``torch.nn.utils.clip_grad_norm_`` at the trainer's default ``--grad-clip 1.0`` before the
  update, then ``zero_grad(set_to_none=True)``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from batchpilot.errors import SpecError
from batchpilot.measure.finetune import apply_finetune
from batchpilot.specs.finetune import FULL, FineTune

if TYPE_CHECKING:
    import torch
    from torch import nn

    from batchpilot.specs.settings import RunSettings

OptimizerImpl = Literal["fused", "foreach", "loop"]
"""``torch.optim``'s implementations: one fused kernel per parameter group (``fused=True``), multi-tensor
``torch._foreach_*`` ops (``foreach=True``), or the per-parameter Python loop (both off)."""

IGNORE_INDEX = -100
"""Target id excluded from the loss (padding), as in ``torch.nn.functional.cross_entropy``'s default."""
DEFAULT_GRAD_CLIP = 1.0
"""The trainer's default ``--grad-clip`` (``OptimConfig.grad_clip``)."""
LEARNING_RATE = 1e-4
"""Learning rate of measured and traced steps (no effect on memory or time)."""
WEIGHT_DECAY = 0.1
"""Weight decay of measured and traced steps: the trainer's default ``--weight-decay``."""
SGD_MOMENTUM = 0.9
FP16_INITIAL_SCALE = 2.0**16
"""``torch.amp.GradScaler``'s initial loss scale."""
#: Config keys of the attention-probability dropout (GPT-2; Llama/Mistral/Qwen2/DeepSeek).
ATTENTION_DROPOUT_KEYS = ("attn_pdrop", "attention_dropout")


@dataclass(frozen=True, kw_only=True, slots=True)
class StepConfig:
    """How the step runs, as far as memory and time depend on it (batchpilot's setting names)."""

    precision: str = "fp32"
    """``fp32`` (no autocast), ``bf16`` or ``fp16`` (autocast; fp16 adds loss scaling)."""
    attention: str = "flash"
    """``flash`` (``transformers``' ``sdpa``) or ``eager``."""
    recompute: str = "none"
    """``none``, ``selective``, ``op`` or ``full`` (:func:`enable_recompute`)."""
    recompute_every: int = 1
    """Checkpoint 1 decoder layer in this many (``op``/``full``; :func:`batchpilot.measure.recompute.apply_recompute`)."""
    compile_layers: bool = False
    """``torch.compile`` each decoder layer (inductor), as torchtitan's ``training.compile`` does."""
    optimizer: str = "adamw"
    """``adamw`` or ``sgd-momentum``."""
    optimizer_impl: OptimizerImpl | None = None
    """None: the trainer's rule (:func:`optimizer_implementation`); set only to measure another
    implementation (e.g. ``foreach``, torch's own CUDA default, in the memory benchmarks)."""
    fsdp: bool = False
    """The parameters are FSDP2 shards (selects ``foreach``, as the trainer does under ``--fsdp``)."""
    grad_clip: float = DEFAULT_GRAD_CLIP
    """Gradient-norm clipping before the update (0: none)."""
    seed: int = 0
    """Seeds the weights (``seed``) and the random tokens (``seed + 1``)."""
    param_dtype: str = "fp32"
    """``bf16``: pure bf16 (the module, gradients and optimizer states in bf16, no autocast); under LoRA the
    adapters' dtype (:func:`batchpilot.measure.finetune.apply_finetune`)."""
    finetune: FineTune = FULL
    """Frozen layers, LoRA or QLoRA (:func:`batchpilot.measure.finetune.apply_finetune`)."""

    @property
    def autocast_precision(self) -> str:
        """The precision :func:`autocast` runs: none (fp32) for pure bf16, else ``precision``."""
        return "fp32" if self.param_dtype == "bf16" else self.precision

    def __post_init__(self) -> None:
        choices = {"precision": ("fp32", "bf16", "fp16"), "attention": ("flash", "eager"),
                   "recompute": ("none", "selective", "op", "full"), "optimizer": ("adamw", "adamw-8bit", "sgd-momentum"),
                   "param_dtype": ("fp32", "bf16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise SpecError(f"a training step cannot run {name} {getattr(self, name)!r}; "
                                f"use one of: {', '.join(allowed)}")
        if self.optimizer_impl not in (None, "fused", "foreach", "loop"):
            raise SpecError(f"optimizer implementation {self.optimizer_impl!r} is not fused, foreach or loop")


def step_config(settings: RunSettings, optimizer_impl: OptimizerImpl | None = None, *, seed: int = 0) -> StepConfig:
    """The step of ``batchpilot`` run settings (one process: ``--engine torch``, no sharding; ``--compile`` is
    not applied: fake tensors and the profiler measure the eager step)."""
    return StepConfig(precision=settings.precision, attention=settings.attention, recompute=settings.recompute,
                      recompute_every=settings.recompute_every,
                      optimizer=settings.optimizer, optimizer_impl=optimizer_impl, seed=seed,
                      param_dtype=settings.param_dtype, finetune=settings.finetune)


# ---------------------------------------------------------------------------------------------- model
def hf_attention(attention: str) -> str:
    """``transformers``' ``attn_implementation`` for batchpilot's ``--attention`` (flash → sdpa)."""
    return "eager" if attention == "eager" else "sdpa"


def build_module(hf_config: Mapping[str, Any], *, name: str = "model", attn_implementation: str | None = "sdpa",
                 seed: int = 0, dropout_in_attention_kernel: bool = False) -> nn.Module:
    """The causal LM of ``hf_config``, randomly initialised in fp32 under ``torch.manual_seed(seed)``.

    ``attn_implementation`` None lets ``transformers`` choose. ``dropout_in_attention_kernel`` models CUDA
    FlashAttention, which applies attention dropout inside the kernel and keeps only its RNG state: the CPU
    SDPA kernels have no dropout and would fall back to the math path (s×s scores, probabilities and mask
    saved), so the attention dropout is set to 0 instead (SDPA only). What ``transformers`` refuses in a
    config that batchpilot's shape check lets through (an unknown ``rope_scaling`` type, an odd
    ``head_dim`` under RoPE) is one line naming the model; its log lines stay off stderr.
    """
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    fields = dict(hf_config)
    if dropout_in_attention_kernel and attn_implementation == "sdpa":
        fields.update({key: 0.0 for key in ATTENTION_DROPOUT_KEYS if fields.get(key)})
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    try:
        config = transformers.AutoConfig.for_model(**fields)
        module = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, **extra)
    except Exception as exc:  # KeyError, huggingface_hub's StrictDataclass…ValidationError, ...
        detail = " ".join(str(exc).split())[:240] or "(no message)"
        raise SpecError(f"model {name!r}: transformers cannot build this config ({type(exc).__name__}: "
                        f"{detail}); fix the field holding that value in the config.json") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return module  # type: ignore[no-any-return]


def enable_recompute(module: nn.Module, recompute: str, seq_len: int, *, every: int = 1) -> None:
    """Hugging Face activation checkpointing of the decoder layers (non-reentrant; ``none``: nothing).

    ``op`` and ``full`` (1 layer in ``every``): :func:`batchpilot.measure.recompute.apply_recompute`, the one
    definition of those policies — ``full`` keeps each layer's input and reruns its forward in backward
    (stopping once backward has what it needs, so each layer's last matmul is not rerun). ``selective``
    checkpoints every layer with :func:`selective_policy`.
    """
    if recompute != "selective":
        from batchpilot.measure.recompute import apply_recompute

        apply_recompute(module, recompute, every=every)
        return
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    kwargs: dict[str, Any] = {"use_reentrant": False, "context_fn": functools.partial(
        create_selective_checkpoint_contexts, functools.partial(selective_policy, seq_len))}
    enable = getattr(module, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers < 5
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[operator]


def selective_policy(seq_len: int, ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    """Save matmul and attention-kernel outputs except s×s score tensors; recompute everything else.

    The selective-checkpoint cache keeps the output of every op marked ``MUST_SAVE``, needed by backward
    or not, so "save all but the attention core" would keep more than no checkpointing. Saving only the
    expensive ops (``mm``/``addmm``/non-score ``bmm``, the SDPA kernels) and recomputing the cheap
    elementwise ones (norms, RoPE, SiLU, softmax) is torchtitan's op-level selective policy; the s×s
    score matmuls of eager attention are recomputed as in Korthikanti et al. 2022 §4.2.
    """
    import torch
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    saved = {aten.mm.default, aten.addmm.default, aten.bmm.default,
             aten._scaled_dot_product_flash_attention_for_cpu.default,
             aten._scaled_dot_product_efficient_attention.default,
             aten._scaled_dot_product_flash_attention.default}
    if op not in saved:
        return CheckpointPolicy.PREFER_RECOMPUTE
    if op == aten.bmm.default:
        left, right = args[0].shape, args[1].shape
        if (left[-2] == seq_len and right[-1] == seq_len) or (left[-2] == seq_len and left[-1] == seq_len):
            return CheckpointPolicy.PREFER_RECOMPUTE  # QKᵀ produces, PV consumes an s×s score tensor
    return CheckpointPolicy.MUST_SAVE


# ---------------------------------------------------------------------------------------------- optimizer
def optimizer_implementation(device_type: str, *, fsdp: bool) -> OptimizerImpl:
    """The trainer's choice: the fused kernel on CPU and CUDA (what HF ``Trainer`` uses by default; on a
    1M-parameter model on CPU it steps ~20× faster than the per-tensor loop), ``foreach`` for FSDP2's
    DTensor shards and for other devices."""
    return "fused" if not fsdp and device_type in ("cpu", "cuda") else "foreach"


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The trainer's groups: weight decay on matrices (``dim ≥ 2``), none on vectors (norms, biases)."""
    params = [p for p in module.parameters() if p.requires_grad]  # frozen ones (fine-tuning) take no step
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def make_optimizer(groups: Iterable[Any], *, name: str = "adamw", implementation: OptimizerImpl,
                   lr: float = LEARNING_RATE, betas: tuple[float, float] = (0.9, 0.95),
                   eps: float = 1e-8, paged: bool = False) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` (or SGD with momentum) over ``groups`` with the given implementation."""
    import torch

    if name == "adamw-8bit" or paged:  # bitsandbytes (8-bit, paged): batchpilot.measure.finetune
        from batchpilot.measure.finetune import bnb_optimizer

        return bnb_optimizer(groups, name=name, paged=paged, lr=lr, betas=betas, eps=eps)
    flags = {"fused": implementation == "fused", "foreach": implementation == "foreach"}
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **flags)
    if name == "sgd-momentum":
        return torch.optim.SGD(groups, lr=lr, momentum=SGD_MOMENTUM, **flags)
    raise SpecError(f"--optimizer {name!r} has no torch step here; use adamw or sgd-momentum")


# ---------------------------------------------------------------------------------------------- forward, loss
def autocast(device_type: str, precision: str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` of ``precision``'s dtype on ``device_type``; fp32: no autocast."""
    import torch

    if precision not in ("bf16", "fp16"):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ over target tokens of −log p(target), in fp32 (padding and :data:`IGNORE_INDEX` excluded)."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def model_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """What the model is called with: the ids, a 4-D (block-causal, packed documents) mask and position ids.

    A 2-D padding mask is dropped: the trainer's rows are right-padded (``batchpilot.train.batching``), so
    under causal attention no real token attends to a padding position, and a padding position's output
    feeds only its own logits, whose targets are ignored — the loss and every gradient are those of the
    masked computation. Passing the mask would make ``transformers`` build a ``b × 1 × s × s`` mask for
    every micro-batch with padding and call SDPA with it, which repeats GQA's K/V to every head and keeps
    the mask per layer: measured (torch 2.13 CPU, tiny-llama-1m, micro-batch 16, sequence 256, fp32) +25 MB
    on a 233 MB step — memory that depended on whether a micro-batch happened to hold padding.
    """
    inputs = {"input_ids": input_ids}
    if attention_mask is not None and attention_mask.dim() == 4:
        inputs["attention_mask"] = attention_mask
    if position_ids is not None:
        inputs["position_ids"] = position_ids
    return inputs


def forward_loss(module: nn.Module, inputs: dict[str, torch.Tensor], targets: torch.Tensor, *,
                 precision: str) -> torch.Tensor:
    """The token-sum loss of one micro-batch: the forward under :func:`autocast`, then
    :func:`cross_entropy_sum` in fp32 outside it. ``inputs``: :func:`model_inputs`, on the module's device."""
    device_type = inputs["input_ids"].device.type
    with autocast(device_type, precision):
        logits = module(**inputs).logits
    return cross_entropy_sum(logits, targets)


class LossScale:
    """fp16 loss scaling as ``torch.amp.GradScaler`` does it, minus its value-dependent skip of the step.

    Backward of ``loss × scale`` (the initial scale 2¹⁶), then GradScaler's in-place
    ``torch._amp_foreach_non_finite_check_and_unscale_`` on the gradients; the step always runs (a fake
    tensor has no value to test for inf/NaN). Memory differs from GradScaler's by a few scalar tensors.
    """

    def __init__(self, device: torch.device) -> None:
        import torch

        self.scale = torch.full((), FP16_INITIAL_SCALE, device=device)
        self.inv_scale = self.scale.reciprocal()
        self.found_inf = torch.zeros((), device=device)

    def backward(self, loss: torch.Tensor, module: nn.Module) -> None:
        import torch

        (loss * self.scale).backward()
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found_inf, self.inv_scale)


# ---------------------------------------------------------------------------------------------- the step
@dataclass(kw_only=True, slots=True)
class TrainingStep:
    """A built model, optimizer and batch, and one training iteration on them."""

    module: Any
    """The causal-LM ``torch.nn.Module``."""
    optimizer: Any
    """The ``torch.optim.Optimizer`` (:func:`make_optimizer`)."""
    input_ids: Any
    """``micro_batch × seq_len`` int64 token ids on the module's device."""
    targets: Any
    """The ids the loss predicts: ``input_ids`` (every position counts, N = micro_batch × seq_len)."""
    config: StepConfig
    loss_scale: LossScale | None = None
    """fp16 only."""

    def forward_backward(self) -> None:
        """Forward under autocast, fp32 token-sum loss × 1/N, backward (loss-scaled for fp16)."""
        loss = forward_loss(self.module, {"input_ids": self.input_ids}, self.targets,
                            precision=self.config.autocast_precision) * (1.0 / self.targets.numel())
        if self.loss_scale is not None:
            self.loss_scale.backward(loss, self.module)
        else:
            loss.backward()

    def optimizer_step(self) -> None:
        """Clip the gradient norm (:attr:`StepConfig.grad_clip`), update, ``zero_grad(set_to_none=True)``."""
        import torch

        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def run(self) -> None:
        """One training iteration."""
        self.forward_backward()
        self.optimizer_step()


def build_step(model: Mapping[str, Any] | nn.Module, config: StepConfig, *, micro_batch: int, seq_len: int,
               device: str | torch.device = "cpu", name: str = "model",
               dropout_in_attention_kernel: bool = False) -> TrainingStep:
    """The module (built from an HF config dict, or the one handed in), its recomputation, optimizer and a
    batch of random tokens on ``device`` — on the current (real or fake) tensor mode.

    ``name`` labels errors; ``dropout_in_attention_kernel``: :func:`build_module`.
    """
    import torch

    dev = torch.device(device)
    if isinstance(model, Mapping):
        module = build_module(model, name=name, attn_implementation=hf_attention(config.attention),
                              seed=config.seed, dropout_in_attention_kernel=dropout_in_attention_kernel)
    else:
        module = model
    if any(p.device != dev for p in module.parameters()):  # (moving a fake module in place fails)
        module.to(dev)
    module = apply_finetune(module, config.finetune, precision=config.precision, param_dtype=config.param_dtype)
    module.train()
    enable_recompute(module, config.recompute, seq_len, every=config.recompute_every)
    if config.compile_layers:
        from batchpilot.measure.recompute import checkpointed_layers

        for layer in checkpointed_layers(module):
            layer.compile()
    implementation = config.optimizer_impl or optimizer_implementation(dev.type, fsdp=config.fsdp)
    weight_decay = WEIGHT_DECAY if config.optimizer == "adamw" else 0.0
    optimizer = make_optimizer(param_groups(module, weight_decay), name=config.optimizer,
                               implementation=implementation, paged=config.finetune.paged)
    embedding: Any = module.get_input_embeddings()  # type: ignore[operator]
    vocab = int(embedding.weight.shape[0])
    generator = torch.Generator().manual_seed(config.seed + 1)
    input_ids = torch.randint(0, vocab, (micro_batch, seq_len), generator=generator, dtype=torch.long).to(dev)
    scale = LossScale(dev) if config.precision == "fp16" else None
    return TrainingStep(module=module, optimizer=optimizer, input_ids=input_ids, targets=input_ids, config=config,
                        loss_scale=scale)


def materialise_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state before the first step: one update on zero gradients (AdamW:
    ``step``, ``exp_avg``, ``exp_avg_sq``; SGD: the momentum buffer), then the gradients are dropped.

    The first real step then already holds state, gradients and activations together — the peak of every
    later step — so a size that does not fit fails in its first step instead of its second. The
    zero-gradient update leaves the weights as they were apart from AdamW's decoupled weight decay
    (× (1 − lr·wd)).
    """
    import torch

    for p in module.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

