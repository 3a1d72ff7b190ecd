"""Memory outside model states and activations: CUDA context, workspaces, collective buffers, allocator
slack, ZeRO-3 gathers — every term a field the probe can calibrate.

    >>> OverheadModel.cpu().cuda_context_bytes
    0
"""

from __future__ import annotations

from dataclasses import dataclass

from batchpilot.errors import SpecError
from batchpilot.units import MIB


@dataclass(frozen=True, kw_only=True, slots=True)
class OverheadModel:
    """Memory outside model states and activations; every term calibratable (the probe measures it).

    Defaults are for one NVIDIA GPU under PyTorch; :meth:`cpu` is for a CPU process (where the
    allocator returns memory to the system and there is no context) and :meth:`zero` counts nothing.
    """

    cuda_context_bytes: int = 512 * MIB
    """CUDA context + kernel images loaded by torch: 0.3–1.3 GiB depending on CUDA/torch version and lazy
    loading; 512 MiB is a mid-range H100/CUDA 12 figure (the same default as the traced
    estimate's ``CudaTerms``). Invisible to ``max_memory_allocated``, visible to OOM."""
    workspace_bytes: int = 32 * MIB
    """cuBLAS workspace: ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` = 8 × 4 MiB per stream (PyTorch
    reproducibility notes)."""
    fragmentation_fraction: float = 0.05
    """Caching-allocator slack (reserved − allocated) as a fraction of the allocated peak: blocks rounded
    to 512 B / 2 MiB and split 20 MiB segments. Typical 3–10 %; ``expandable_segments:True`` lowers it."""
    comm_buffer_bytes: int = 512 * MIB
    """Collective buffers when more than one GPU is involved: NCCL channels (``NCCL_BUFFSIZE`` 4 MiB per
    channel and peer) plus DDP/ZeRO gradient buckets (DDP ``bucket_cap_mb=25``, flattened copies)."""
    gather_layers: int = 2
    """ZeRO-3/FSDP full-shard: unsharded layers alive at once (the computing layer + one prefetched)."""
    optimizer_foreach: bool = True
    """``torch`` engine: the optimizer runs its ``foreach`` implementation (the default for CUDA tensors)
    rather than the per-tensor loop (the default for CPU tensors); see
    :data:`OPTIMIZER_STEP_TRANSIENT_BYTES`."""

    def __post_init__(self) -> None:
        for name in ("cuda_context_bytes", "workspace_bytes", "comm_buffer_bytes", "gather_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SpecError(f"overhead {name} {value!r} must be a non-negative integer")
        if not 0.0 <= self.fragmentation_fraction < 1.0:
            raise SpecError(
                f"overhead fragmentation_fraction {self.fragmentation_fraction!r} must be in [0, 1)"
            )

    @classmethod
    def cpu(cls, *, optimizer_foreach: bool = False) -> OverheadModel:
        """A CPU process: no CUDA context, workspace or fragmentation term, small (gloo) collectives, and
        torch's CPU default optimizer loop unless ``optimizer_foreach``."""
        return cls(cuda_context_bytes=0, workspace_bytes=0, fragmentation_fraction=0.0, comm_buffer_bytes=0,
                   optimizer_foreach=optimizer_foreach)

    @classmethod
    def zero(cls) -> OverheadModel:
        """Nothing but model states and activations (the ZeRO paper's and Korthikanti's accounting)."""
        return cls(cuda_context_bytes=0, workspace_bytes=0, fragmentation_fraction=0.0, comm_buffer_bytes=0,
                   gather_layers=0)
