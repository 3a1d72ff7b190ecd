"""Memory outside model states and activations: CUDA context, workspaces, collective buffers, allocator
slack, ZeRO-3 gathers — every term a field the probe can calibrate.

What the CUDA caching allocator reserves beyond what is allocated is modelled structurally by
:mod:`batchpilot.estimate.memory` (the freed 16-bit logits, one layer's forward transients, FSDP2's
all-gather and reduce-scatter stream pools; ``c10/cuda/CUDACachingAllocator.cpp`` @ ``001074d2``: blocks are
cached per stream and reused only on their stream, ``reserved_bytes`` never shrinks without
``empty_cache``) when :attr:`OverheadModel.caching_allocator` is set; ``fragmentation_fraction`` is only
a residual allowance on top (0 by default).

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
    loading (274 MiB with lazy loading vs 636 MiB eager, pytorch PR #86509; ≈ 400 MiB with CUDA ≥ 11.7,
    pytorch issue #109888); 512 MiB is a mid-range H100/CUDA 12 figure (the same default as the traced
    estimate's ``CudaTerms``). Outside the caching allocator: invisible to ``max_memory_reserved``,
    visible to OOM."""
    workspace_bytes: int = 32 * MIB
    """cuBLAS workspace of the compute stream: 32 MiB on Hopper and Blackwell (``parseChosenWorkspaceSize``
    in aten/src/ATen/cuda/CublasHandlePool.cpp; pytorch PR #120925); allocated through the caching
    allocator, so part of reserved memory."""
    fragmentation_fraction: float = 0.0
    """Residual caching-allocator slack as a fraction of the allocated peak, on top of the structural
    terms (:attr:`caching_allocator`): 0 by default; a probe on the target GPU can calibrate it."""
    comm_buffer_bytes: int = 512 * MIB
    """NCCL buffers per communicator (process group) a GPU takes part in — data/FSDP, tensor, pipeline,
    context and expert parallel each open one: per connection (channel × peer × protocol) SIMPLE 4 MiB
    (``NCCL_BUFFSIZE``), LL128 4.7 MiB, LL 0.5 MiB, connected lazily for the algorithms used; H100 8-GPU
    rings use ≥ 24 channels, NVLS adds 32 MiB per head (``src/init.cc``, ``src/transport/nvls.cc`` @ NCCL
    ``5067397c``): 0.3–1 GiB per communicator. Outside the caching allocator (not in ``reserved``)."""
    gather_layers: int = 2
    """ZeRO-3/FSDP full-shard: unsharded layers alive at once (the computing layer + one prefetched)."""
    optimizer_foreach: bool = True
    """``torch`` engine: the optimizer runs its ``foreach`` implementation (the default for CUDA tensors)
    rather than the per-tensor loop (the default for CPU tensors); see
    :data:`OPTIMIZER_STEP_TRANSIENT_BYTES`."""
    optimizer_fused: bool = False
    """``torch`` engine: the optimizer runs its fused kernel (``torch.optim.AdamW(fused=True)``: torchtune's
    configs, Hugging Face's ``adamw_torch_fused``), which updates in place: no step temporaries. Overrides
    :attr:`optimizer_foreach`."""
    caching_allocator: bool = True
    """Memory comes from the CUDA caching allocator: count what it reserves beyond what is allocated (the
    structural terms of :mod:`batchpilot.estimate.memory`). False for a CPU process (the allocator returns
    memory to the system)."""
    moe_token_imbalance: float = 1.0
    """Tokens the busiest expert-parallel rank processes relative to the balanced share
    (:data:`batchpilot.estimate.activations.MOE_TOKEN_IMBALANCE`: 1.0, balanced routing)."""

    def __post_init__(self) -> None:
        for name in ("cuda_context_bytes", "workspace_bytes", "comm_buffer_bytes", "gather_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SpecError(f"overhead {name} {value!r} must be a non-negative integer")
        if not 0.0 <= self.fragmentation_fraction < 1.0:
            raise SpecError(
                f"overhead fragmentation_fraction {self.fragmentation_fraction!r} must be in [0, 1)"
            )
        if not 1.0 <= self.moe_token_imbalance <= 1024.0:
            raise SpecError(f"overhead moe_token_imbalance {self.moe_token_imbalance!r} must be in [1, 1024] "
                            f"(1 = balanced routing)")

    @classmethod
    def cpu(cls, *, optimizer_foreach: bool = False) -> OverheadModel:
        """A CPU process: no CUDA context, workspace or allocator slack, small (gloo) collectives, and
        torch's CPU default optimizer loop unless ``optimizer_foreach``."""
        return cls(cuda_context_bytes=0, workspace_bytes=0, fragmentation_fraction=0.0, comm_buffer_bytes=0,
                   optimizer_foreach=optimizer_foreach, caching_allocator=False)

    @classmethod
    def zero(cls) -> OverheadModel:
        """Nothing but model states and activations (the ZeRO paper's and Korthikanti's accounting)."""
        return cls(cuda_context_bytes=0, workspace_bytes=0, fragmentation_fraction=0.0, comm_buffer_bytes=0,
                   gather_layers=0, caching_allocator=False)
