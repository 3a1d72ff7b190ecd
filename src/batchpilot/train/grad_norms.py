"""Squared gradient norms at two batch sizes, measured inside a training step without extra gradient copies.

Two meters feed :class:`batchpilot.estimate.noise.NoiseSample`:

- :class:`MicroGradNorms` — single process with gradient accumulation. A tensor hook on every parameter
  sees *this backward's* gradient before autograd adds it into ``param.grad``, so the micro-batch
  gradient's squared norm is summed per parameter (one fp64 scalar each) and no copy of the gradients is
  kept. The accumulated ``param.grad`` after the last micro-step is the big-batch gradient.
- :func:`noise_allreduce_hook` — torch DDP. A communication hook (``model.register_comm_hook``) sees each
  gradient bucket before the all-reduce (this rank's local gradient) and after it (the global mean), so
  B_small = local batch and B_big = global batch, at the cost of one fp64 reduction per bucket.

Norms are accumulated as fp64 tensors on the gradients' device (no host sync inside backward); the
caller converts once per step. Loss scales (AMP GradScaler, 1/accumulation normalisation) are removed
by the caller's ``scale`` arguments: ``|g_mean|² = |g_as_stored|² × scale²``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from batchpilot.errors import BatchpilotError


def _sq_norm(tensor: torch.Tensor) -> torch.Tensor:
    """|t|² accumulated in fp64 (no fp64 copy of the tensor for fp32/bf16 inputs beyond one kernel)."""
    return torch.linalg.vector_norm(tensor.detach(), dtype=torch.float64).square()


def grads_sq_norm(params: Iterable[torch.nn.Parameter]) -> float:
    """|grad|² over all parameters that have a gradient, in fp64 (one host sync)."""
    norms = [_sq_norm(p.grad) for p in params if p.grad is not None]
    if not norms:
        raise BatchpilotError("no parameter has a gradient; call this after backward()")
    return float(torch.stack([n.to(norms[0].device) for n in norms]).sum().item())


class MicroGradNorms:
    """Per-backward squared gradient norm via parameter tensor hooks (no gradient copy).

    Use: create once (it registers hooks), then after each micro-step's ``backward`` call
    :meth:`pop` to take that micro-batch's |g|² (times ``scale²``). :meth:`remove` unregisters.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter]) -> None:
        self._norms: list[torch.Tensor] = []
        self._handles = [p.register_hook(self._hook) for p in params if p.requires_grad]
        if not self._handles:
            raise BatchpilotError("MicroGradNorms: the model has no trainable parameters")
        self.enabled = True
        """When False the hooks do nothing (e.g. on steps the schedule does not measure)."""

    def _hook(self, grad: torch.Tensor) -> None:
        if self.enabled:  # one kernel per parameter; the squares are summed once, in pop()
            self._norms.append(torch.linalg.vector_norm(grad.detach(), dtype=torch.float64))

    def pop(self, scale: float = 1.0) -> float:
        """|g|² of the backward(s) since the last pop, times ``scale²``; resets the sum."""
        if not self._norms:
            raise BatchpilotError("MicroGradNorms.pop(): no gradient seen since the last pop; call after backward()")
        device = self._norms[0].device
        total = torch.stack([n.to(device) for n in self._norms]).square().sum()
        self._norms = []
        return float(total.item()) * scale * scale

    def remove(self) -> None:
        """Unregister the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class DDPNoiseState:
    """State of :func:`noise_allreduce_hook`: this step's local and global |g|² (fp64 tensors).

    Register with ``ddp_model.register_comm_hook(state, noise_allreduce_hook)``. After the step's synchronising
    backward call :meth:`pop` for ``(mean over ranks of local |g|², global |g|²)``; it issues one extra
    all-reduce of a 1-element fp64 tensor (the local norms averaged over ranks, for a lower-variance estimate).
    """

    def __init__(self, process_group: Any = None) -> None:
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.local: torch.Tensor | None = None
        self.global_: torch.Tensor | None = None

    def pop(self, scale: float = 1.0) -> tuple[float, float]:
        """(local |g|² averaged over ranks, global |g|²), each times ``scale²``; resets."""
        if self.local is None or self.global_ is None:
            raise BatchpilotError("DDPNoiseState.pop(): no all-reduce seen since the last pop; call after the "
                                  "synchronising backward (not inside no_sync)")
        local = self.local.clone()
        dist.all_reduce(local, group=self.process_group)
        values = float(local.item()) / self.world_size, float(self.global_.item())
        self.local = self.global_ = None
        return values[0] * scale * scale, values[1] * scale * scale


def noise_allreduce_hook(state, bucket):  # type: ignore[no-untyped-def]
    """DDP communication hook: the default mean all-reduce, recording |bucket|² before and after it.

    Annotations are attached below as objects: DDP compares them with ``dist.GradBucket`` and would
    reject the strings that ``from __future__ import annotations`` leaves.
    """
    buffer = bucket.buffer()
    local = _sq_norm(buffer)
    state.local = local if state.local is None else state.local + local
    buffer.div_(state.world_size)
    work = dist.all_reduce(buffer, group=state.process_group, async_op=True)

    def _record(fut: torch.futures.Future[Any]) -> torch.Tensor:
        reduced: torch.Tensor = fut.value()[0]
        value = _sq_norm(reduced)
        state.global_ = value if state.global_ is None else state.global_ + value
        return reduced

    return work.get_future().then(_record)


noise_allreduce_hook.__annotations__ = {
    "state": DDPNoiseState, "bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}
