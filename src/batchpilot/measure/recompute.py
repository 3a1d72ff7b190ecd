"""Activation recomputation applied to a real module: the policies batchpilot's memory model counts.

Example (CPU, seconds)::

    >>> import transformers
    >>> from batchpilot.specs.model import load_model
    >>> config = transformers.AutoConfig.for_model(**load_model("tiny-llama-1m").hf_config)
    >>> module = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    >>> apply_recompute(module, "op", every=2)
    >>> [layer.gradient_checkpointing for layer in checkpointed_layers(module)]
    [False, True, False, True]

One definition per ``--recompute`` value, shared by everything that runs a step (the training step of
:mod:`batchpilot.measure.step`, the traced estimate, the CPU measurements of the memory model's tests):

- ``full``: every checkpointed decoder layer keeps only its inputs and reruns its forward in backward
  (non-reentrant ``torch.utils.checkpoint``; torchtitan ``FullAC`` = ``ptd_checkpoint_wrapper(block)``,
  ``torchtitan/distributed/activation_checkpoint.py`` @ ``b5bcd76c``).
- ``op``: torchtitan's per-op selective checkpointing (``SelectiveAC`` at the same file and commit, and
  ``_apply_ac_to_transformer_block`` in ``torchtitan/parallelisms/parallelize_llama.py`` @ ``9dec370a``):
  every op in :func:`op_save_ops` has its output cached (``CheckpointPolicy.MUST_SAVE``), except every
  second ``mm`` of a layer (the counter restarts at each layer call and counts forward and recompute
  separately); everything else is recomputed.
- ``recompute_every`` N (``every``): only layers N, 2N, … (1-based) are checkpointed, the others keep all
  their activations — torchtitan's integer ``selective_ac_option`` (``_apply_layer_sac``,
  ``torchtitan/models/llama3/parallelize_llama.py`` @ ``e7c0cae9``: a global counter, ``count % N == 0``).
  ``transformers``' own ``every_n_layers`` checkpoints layers 0, N, 2N, … instead (``_set_gradient_checkpointing``,
  transformers 5.25): one more layer when N does not divide the layer count.

``selective`` (Megatron-LM's ``--recompute-granularity selective``: the attention core only) is not applied
here: under SDPA/flash attention it keeps what ``none`` keeps apart from the softmax statistics.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from batchpilot.errors import SpecError
from batchpilot.specs.settings import check_recompute_every

if TYPE_CHECKING:
    from torch import nn

#: Recompute values this module applies to a module (``none`` applies nothing).
APPLIED = ("none", "op", "full")


def op_save_ops() -> set[Any]:
    """The ops whose outputs torchtitan's per-op policy saves (``_get_default_save_ops`` @ ``b5bcd76c``).

    ``torch._functorch.partitioners.get_default_op_list().compute_intensive_ops`` (``mm``, ``addmm``,
    ``bmm``, ``_scaled_mm``, the flash/efficient SDPA kernels, convolutions), plus the cuDNN/math SDPA
    kernels, ``max`` (fp8 amax), ``linear`` and ``topk``, plus the CPU flash kernel
    ``_scaled_dot_product_flash_attention_for_cpu``: it plays the CUDA flash kernel's role on a CPU (same
    outputs: the attention output and the fp32 log-sum-exp), so CPU measurements test the GPU policy.
    """
    import torch
    from torch._functorch.partitioners import get_default_op_list

    aten = torch.ops.aten
    ops: set[Any] = {op.default for op in get_default_op_list().compute_intensive_ops}  # type: ignore[attr-defined]
    ops |= {aten._scaled_dot_product_cudnn_attention.default, aten._scaled_dot_product_attention_math.default,
            aten.max.default, aten.linear.default, aten.topk.default,
            aten._scaled_dot_product_flash_attention_for_cpu.default}
    return ops


def op_policy() -> Callable[..., Any]:
    """A fresh policy for one layer call: save :func:`op_save_ops`, but recompute every second ``mm``."""
    import torch
    from torch.utils.checkpoint import CheckpointPolicy

    save = op_save_ops()
    mm_ops = (torch.ops.aten.mm.default, torch.ops.aten.linear.default)
    counts = {"forward": 0, "recompute": 0}

    def policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> Any:
        mode = "recompute" if ctx.is_recompute else "forward"
        if func in mm_ops:
            counts[mode] += 1
        if func in save and not (func in mm_ops and counts[mode] % 2 == 0):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _op_context() -> Any:
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(op_policy())


def checkpoint_kwargs(recompute: str) -> dict[str, Any]:
    """Keyword arguments of ``torch.utils.checkpoint.checkpoint`` for one checkpointed layer."""
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if recompute == "op":
        kwargs["context_fn"] = _op_context
    return kwargs


def checkpointed(index: int, every: int) -> bool:
    """Whether layer ``index`` (0-based) is checkpointed when 1 layer in ``every`` is: layers
    ``every``, 2·``every``, … counting from 1 (torchtitan's ``count % N == 0``)."""
    return (index + 1) % every == 0


def checkpointed_layers(module: nn.Module) -> list[Any]:
    """The decoder layers of a ``transformers`` model that can be checkpointed, in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in module.modules() if isinstance(m, GradientCheckpointingLayer)]


def apply_recompute(module: nn.Module, recompute: str, *, every: int = 1) -> None:
    """Checkpoint the decoder layers of a ``transformers`` causal LM with ``recompute`` (``none``, ``op``,
    ``full``), 1 layer in ``every``."""
    if recompute not in APPLIED:
        raise SpecError(f"recomputation {recompute!r} cannot be applied to a real module here; use one of: "
                        f"{', '.join(APPLIED)} (selective is counted by --method analytic)")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise SpecError(f"--recompute-every {every!r} must be a positive integer (1 checkpoints every layer)")
    if recompute == "none":
        return
    enable = getattr(module, "activation_checkpointing_enable", None)
    kwargs = checkpoint_kwargs(recompute)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers < 5
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[operator]
    layers = list(checkpointed_layers(module))
    check_recompute_every(every, len(layers))
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = checkpointed(index, every)


def recompute_function(recompute: str, every: int = 1) -> Callable[[Any], None]:
    """:func:`apply_recompute` bound to one setting (for code that takes a module hook)."""
    return functools.partial(apply_recompute, recompute=recompute, every=every)
