"""Squared gradient norms at two batch sizes, measured inside a training step without extra gradient copies.

Two meters feed :class:`batchpilot.estimate.noise.NoiseSample`:

- :class:`MicroGradNorms` — single process with gradient accumulation. A tensor hook on every parameter
  sees *this backward's* gradient before autograd adds it into ``param.grad``, so the micro-batch
  gradient's squared norm is summed per parameter (one fp64 scalar each) and no copy of the gradients is
  kept. The accumulated ``param.grad`` after the last micro-step is the big-batch gradient.
- Under FSDP2 the parameters are DTensor shards and the forward runs on FSDP2's unsharded parameters
  (``FSDPParam._unsharded_param``, created at the first all-gather and reused after); :func:`gradient_leaves`
  returns those, so the same tensor hooks see each rank's whole micro-batch gradient before the
  reduce-scatter, and :func:`grads_sq_norm` of the sharded gradients squares each rank's shards and
  all-reduces the sum (the global gradient's |g|²).
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


def _by_mesh(grads: Iterable[torch.Tensor]) -> dict[Any, list[torch.Tensor]]:
    """Gradients grouped by their DTensor device mesh (None: plain tensors). FSDP2 with tensor parallelism puts
    the TP-sharded parameters on the 2-D mesh and the others on its ``dp`` dimension, and DTensor reductions
    (``torch.stack``, foreach norms) need one mesh."""
    groups: dict[Any, list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault(getattr(g, "device_mesh", None), []).append(g)
    return groups


def _fsdp_params(model: torch.nn.Module) -> list[Any]:
    """Every ``FSDPParam`` of an FSDP2 model, once (empty without FSDP2; the modules of one grouped unit, such
    as ``[norm, lm_head]``, share one state)."""
    from torch.distributed.fsdp import FSDPModule

    found: dict[int, Any] = {}
    for module in model.modules():
        if isinstance(module, FSDPModule):
            state: Any = module._get_fsdp_state()
            for group in state._fsdp_param_groups:
                found.update((id(fp), fp) for fp in group.fsdp_params)
    return list(found.values())


def local_grads_sq_norm(model: torch.nn.Module) -> float:
    """|g|² of this rank's accumulated, not yet synchronised gradient: ``p.grad``, or under FSDP2 (no-sync
    micro-steps keep it unsharded) each ``FSDPParam``'s ``unsharded_accumulated_grad`` (when the reduce dtype
    differs from the parameter's) or its unsharded parameter's ``.grad`` (torch 2.13 ``_fsdp_param.py``
    ``to_accumulated_grad_if_needed``)."""
    params = _fsdp_params(model)
    if not params:
        return grads_sq_norm(model.parameters())
    present = []
    for fp in params:
        grad = fp.unsharded_accumulated_grad
        if grad is None and hasattr(fp, "_unsharded_param"):
            grad = fp._unsharded_param.grad
        if grad is not None:
            present.append(grad)
    if not present:
        raise BatchpilotError("no unsharded gradient is kept; call this after a micro-step without synchronisation")
    return float(torch.stack([_sq_norm(g) for g in present]).sum())


def gradient_leaves(model: torch.nn.Module) -> tuple[list[torch.Tensor], bool]:
    """The tensors autograd computes parameter gradients for, and whether they are FSDP2's unsharded
    parameters: ``model.parameters()`` without FSDP2; with it, every ``FSDPParam``'s ``_unsharded_param``
    (torch 2.13 ``torch/distributed/fsdp/_fully_shard/_fsdp_param.py`` ``init_unsharded_param``: created at
    the first all-gather, so call this after a forward)."""
    leaves = [fp._unsharded_param for fp in _fsdp_params(model) if hasattr(fp, "_unsharded_param")]
    if leaves:
        return leaves, True
    return list(model.parameters()), False


def grads_sq_norm(params: Iterable[torch.nn.Parameter]) -> float:
    """|grad|² over all parameters that have a gradient, in fp64 (one host sync per device mesh).

    FSDP2 and tensor-parallel gradients are DTensor shards: per mesh, each rank squares its local shards and
    the sum is all-reduced (DTensor's partial-sum reduction of the norm), so every rank returns the full
    gradient's |g|² — the B_big measurement of the noise scale under FSDP2."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        raise BatchpilotError("no parameter has a gradient; call this after backward()")
    total = 0.0
    for group in _by_mesh(grads).values():
        square: Any = torch.stack([_sq_norm(g) for g in group]).sum() if len(group) > 1 else _sq_norm(group[0])
        total += float(square.full_tensor() if hasattr(square, "full_tensor") else square)
    return total


def clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` over gradients that may live on several device meshes: the 2-norm of
    each mesh's gradients (``get_total_norm``; a DTensor norm is all-reduced by ``full_tensor``), combined,
    then every gradient × ``min(1, max_norm / (norm + 1e-6))`` (``clip_grads_with_norm_``). With one mesh (or
    none) it is ``clip_grad_norm_`` itself. Returns the norm before clipping."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return 0.0
    groups: dict[Any, list[torch.nn.Parameter]] = {}
    for p in with_grad:
        groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p)
    if len(groups) == 1:
        norm: Any = torch.nn.utils.clip_grad_norm_(with_grad, max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    norms = []
    for group in groups.values():
        part: Any = torch.nn.utils.get_total_norm([p.grad for p in group if p.grad is not None], 2.0)
        norms.append(part.full_tensor() if hasattr(part, "full_tensor") else part)
    total = torch.linalg.vector_norm(torch.stack(norms))
    from torch.distributed.tensor.experimental import implicit_replication

    with implicit_replication():
        for group in groups.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return float(total)


class MicroGradNorms:
    """Per-backward squared gradient norm via parameter tensor hooks (no gradient copy).

    Use: create once (it registers hooks), then after each micro-step's ``backward`` call
    :meth:`pop` to take that micro-batch's |g|² (times ``scale²``). :meth:`remove` unregisters.
    """

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
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
