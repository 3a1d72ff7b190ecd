"""Hooks into the training loop: the seam the gradient-noise / adaptive-batch code plugs into.

A hook is any object with the four methods of :class:`TrainHook` (subclass :class:`BaseHook` to get
no-op defaults). The loop calls, for every optimizer step:

1. ``on_micro_step(model, info)`` after each micro-step's ``backward()``;
2. ``on_gradients(model, info)`` once the accumulated gradients are complete: synchronised across
   ranks, unscaled (fp16: ``GradScaler.unscale_`` has run), **before** clipping and the optimizer
   step. Its returned mapping is merged into the step's ``metrics.jsonl`` record;
3. ``on_step_end(record)`` with the finished record (after the optimizer step);

and ``state_dict()`` / ``load_state_dict()`` when checkpointing and resuming. A checkpoint keeps each hook's
state under the hook's key (:func:`hook_states`: its ``name`` attribute, or its class name; ``#2``, ``#3``
for repeats), and a resume whose hooks have other keys than the checkpoint's is refused in one line
(:func:`restore_hook_states`): a state is never given to another hook.

Gradient scaling contract (what ``p.grad`` holds). The loss of a micro-step is
``Σ_{target tokens t in the micro-batch} ℓ_t × world_size × loss_scale / N_global`` where ``N_global`` is
the number of target tokens in the whole global batch (all micro-steps, all ranks): the
``world_size`` factor cancels DDP/FSDP's averaging over ranks, ``loss_scale`` is the fp16
``GradScaler`` scale (1 otherwise). Hence, on one rank, before synchronisation::

    p.grad × info.grad_to_sum_factor == ∇ Σ_{targets accumulated so far on this rank} ℓ_t

and in ``on_gradients`` (synchronised, unscaled) ``p.grad == ∇ (1/N_global) Σ_{all targets} ℓ_t``, the
large-batch token-mean gradient. A micro-batch's own mean gradient is the increment of the
``grad_to_sum_factor``-scaled accumulator divided by ``info.micro_target_tokens``.

Under DDP the last micro-step's backward all-reduces (``info.grads_synced`` is then True). A hook that
needs each rank's local gradient of the whole local batch (McCandlish et al. 2018, App. A.1:
B_small = local batch, B_big = global batch) sets ``requires_local_gradients = True``: the loop then
skips DDP's sync on every micro-step, calls ``on_local_gradients(model, info)`` with the rank-local
accumulated gradients, and all-reduces them itself (DDP only; FSDP2 refuses such hooks).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import nn

from batchpilot.errors import BatchpilotError


@dataclass(frozen=True, kw_only=True, slots=True)
class MicroStepInfo:
    """What the loop knows right after one micro-step's ``backward()``."""

    step: int
    """0-based index of the optimizer step being accumulated."""
    micro_index: int
    """0-based index of this micro-step within the step (on this rank)."""
    num_micro_steps: int
    """Micro-steps in this optimizer step (gradient-accumulation steps)."""
    micro_target_tokens: int
    """Target tokens (tokens with a label) in this micro-batch on this rank."""
    local_target_tokens: int
    """Target tokens of the whole step on this rank (all its micro-batches)."""
    global_target_tokens: int
    """Target tokens of the whole global batch (all micro-steps, all ranks): the loss denominator."""
    micro_batch_sequences: int
    """Sequences (rows) in this micro-batch."""
    loss_sum: float
    """Σ ℓ_t over this micro-batch's targets (nats; not normalised, not loss-scaled)."""
    loss_scale: float
    """fp16 ``GradScaler`` scale applied to this backward; 1.0 for fp32/bf16."""
    grad_to_sum_factor: float
    """``N_global / (world_size × loss_scale)``: turns the accumulated ``p.grad`` into ∇ of the loss *sum*."""
    grads_synced: bool
    """True when ``p.grad`` has already been all-reduced across ranks (last micro-step under DDP)."""
    rank: int
    world_size: int


@dataclass(frozen=True, kw_only=True, slots=True)
class StepInfo:
    """What the loop knows when the accumulated gradients are complete (before clipping)."""

    step: int
    """0-based index of this optimizer step."""
    global_batch_sequences: int
    """Sequences (rows) in this global batch."""
    global_target_tokens: int
    """Target tokens in this global batch (the loss denominator)."""
    local_target_tokens: int
    """Target tokens on this rank."""
    tokens_seen: int
    """Input tokens (padding excluded) consumed before this step."""
    loss_scale: float
    """fp16 ``GradScaler`` scale used for this step's backward passes (already removed from ``p.grad``
    in ``on_gradients``); 1.0 for fp32/bf16."""
    grad_to_sum_factor: float
    """In ``on_local_gradients`` only: turns the rank-local ``p.grad`` into ∇ of the rank's loss sum."""
    lr: float
    """Learning rate the optimizer step will use."""
    rank: int
    world_size: int


@runtime_checkable
class TrainHook(Protocol):
    """The interface the loop calls. Implementations must behave identically on every rank."""

    requires_local_gradients: bool
    """True: the loop gives ``on_local_gradients`` the rank-local gradients before syncing (DDP only)."""

    def on_micro_step(self, model: nn.Module, info: MicroStepInfo) -> None:
        """After one micro-step's backward; ``p.grad`` holds the running accumulation (see module doc)."""

    def on_local_gradients(self, model: nn.Module, info: StepInfo) -> None:
        """Only when ``requires_local_gradients``: rank-local, still loss-scaled accumulated gradients."""

    def on_gradients(self, model: nn.Module, info: StepInfo) -> Mapping[str, float]:
        """Synchronised, unscaled token-mean gradients before clipping; returns extra metrics fields."""
        ...

    def on_step_end(self, record: Mapping[str, Any]) -> None:
        """After the optimizer step, with the step's finished ``metrics.jsonl`` record."""

    def state_dict(self) -> dict[str, Any]:
        """JSON/torch-serialisable state saved in checkpoints."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class BaseHook:
    """No-op implementation of every :class:`TrainHook` method; override what you need."""

    requires_local_gradients: bool = False
    name: str = ""
    """The key of this hook's state in checkpoints (empty: the class name)."""

    def on_micro_step(self, model: nn.Module, info: MicroStepInfo) -> None:
        return None

    def on_local_gradients(self, model: nn.Module, info: StepInfo) -> None:
        return None

    def on_gradients(self, model: nn.Module, info: StepInfo) -> Mapping[str, float]:
        return {}

    def on_step_end(self, record: Mapping[str, Any]) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None


def hook_keys(hooks: Sequence[TrainHook]) -> list[str]:
    """Each hook's checkpoint key: its ``name`` (or class name), with ``#2``, ``#3`` … for repeats."""
    keys: list[str] = []
    for hook in hooks:
        base = getattr(hook, "name", "") or type(hook).__name__
        count = sum(1 for k in keys if k == base or k.startswith(base + "#"))
        keys.append(base if count == 0 else f"{base}#{count + 1}")
    return keys


def hook_states(hooks: Sequence[TrainHook]) -> dict[str, Any]:
    """The checkpoint's ``hooks`` entry: each hook's state under its key."""
    return {key: hook.state_dict() for key, hook in zip(hook_keys(hooks), hooks, strict=True)}


def restore_hook_states(hooks: Sequence[TrainHook], saved: Mapping[str, Any] | Sequence[Any] | None) -> None:
    """Give each hook the state saved under its key; refuse in one line when the keys differ.

    A checkpoint written before states were keyed holds a list: it is accepted only when it has as many
    entries as there are hooks (the order they were saved in is the order they are built in)."""
    keys = hook_keys(hooks)
    if saved is None:
        saved = {}
    if not isinstance(saved, Mapping):
        if len(saved) != len(hooks):
            raise BatchpilotError(
                f"the checkpoint holds {len(saved)} hook state(s) but this run has {len(hooks)} hook(s) ({', '.join(keys) or 'none'}); "
                f"resume with the settings the run started with (--batch-schedule, --noise-every/--no-noise) or use a new --out")
        saved = dict(zip(keys, saved, strict=True))
    if set(saved) != set(keys):
        raise BatchpilotError(
            f"the checkpoint holds state for the hooks {sorted(saved) or 'none'} but this run has {sorted(keys) or 'none'}; "
            f"resume with the settings the run started with (--batch-schedule, --noise-every/--no-noise) or use a new --out")
    for key, hook in zip(keys, hooks, strict=True):
        hook.load_state_dict(saved[key])
