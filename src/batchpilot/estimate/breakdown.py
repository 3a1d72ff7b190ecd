"""The per-GPU memory record every estimator returns (analytic, traced) and the probe compares with.

JSON contract (``memory`` key of ``batchpilot memory --json`` and of each plan): bytes for
``weights``, ``gradients``, ``optimizer``, ``activations``, ``overhead``, ``total``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryBreakdown:
    """Peak memory of one GPU (or one CPU process) during a training step, in bytes."""

    weights_bytes: int
    """Parameters as stored (plus any compute copies the engine keeps, e.g. fp32 masters of ``deepspeed``
    are optimizer state, not weights)."""
    gradients_bytes: int
    optimizer_bytes: int
    """Optimizer states, including fp32 master weights where the engine keeps them separately."""
    activations_bytes: int
    """Tensors saved for backward at the peak plus the transient buffers alive then (logits, loss)."""
    overhead_bytes: int
    """Everything else: CUDA context, allocator fragmentation, communication buffers, temporaries."""
    details: dict[str, int] = field(default_factory=dict, compare=False)
    """Optional finer terms (name → bytes) that sum into the categories above; for reports."""

    @property
    def total_bytes(self) -> int:
        return (
            self.weights_bytes + self.gradients_bytes + self.optimizer_bytes
            + self.activations_bytes + self.overhead_bytes
        )

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON shape: category → bytes, ``total``, and ``details`` when present."""
        record: dict[str, Any] = {
            "weights": self.weights_bytes,
            "gradients": self.gradients_bytes,
            "optimizer": self.optimizer_bytes,
            "activations": self.activations_bytes,
            "overhead": self.overhead_bytes,
            "total": self.total_bytes,
        }
        if self.details:
            record["details"] = dict(self.details)
        return record
