"""Traced estimate: run the real ``transformers`` model under fake tensors and track every allocation.

Examples (the first is CPU-sized and takes seconds)::

    batchpilot memory --model tiny-llama-15m --micro-batch 4 --seq-len 256 --method traced
    batchpilot memory --model llama-2-7b --micro-batch 1 --seq-len 2048 --method traced --json

How (measured here: traced peak = CPU allocator peak, ``benchmarks/results/traced_accuracy.md``): the
training step of :mod:`batchpilot.measure.step` — the one the trainer and the probe run — is built from
``ModelSpec.hf_config`` inside ``torch._subclasses.fake_tensor.FakeTensorMode`` on the fake CPU device, so
no parameter or activation holds real memory. It lives in ``measure/`` because it executes the real module.
Two training iterations run under ``torch.distributed._tools.mem_tracker.MemTracker`` — forward with
the run's autocast dtype, the fp32 token-sum loss, backward, gradient clipping, optimizer step,
``zero_grad(set_to_none=True)`` — so the second one has optimizer state, as every step of a real run
after the first does. MemTracker counts each storage's bytes from its creation to its
garbage collection and records the per-category snapshot at the highest total; that equals the CPU
allocator's peak for the same computation (measured with the torch profiler, see
:mod:`batchpilot.measure.cpu_peak` and ``tests/estimate/test_traced.py``: exact to the byte on the tiny
presets, fp32 and bf16, with and without recomputation). Two things of the real step are not ops on
tensors, so the trace reproduces them explicitly: ``transformers``' packed-sequence check, which reads
values (:func:`_unpacked_rows`), and the CPU RNG state that checkpointing stashes per layer
(:func:`_tracked_rng_states`); without them the trace over-counted checkpointed steps by 3.5–20 %
(tiny-llama-1m, fp32, micro-batch 32, sequence 64–512). FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` with formulas
added for the CPU flash-attention kernels, which it lacks.

Settings are mapped onto the real module (:class:`batchpilot.measure.step.StepConfig`), never approximated:

- ``precision``: ``fp32`` no autocast; ``bf16``/``fp16`` ``torch.autocast`` of that dtype with fp32
  weights, gradients and optimizer states (``engine="torch"``; fp16 adds GradScaler's loss scaling and
  unscaling, :class:`batchpilot.measure.step.LossScale`).
  ``fp8`` needs Transformer-Engine kernels that do not exist on CPU: an error.
- ``recompute``: ``full`` is Hugging Face activation checkpointing of every decoder layer
  (non-reentrant ``torch.utils.checkpoint``; it stops recomputing once backward has what it needs, so
  each layer's last matmul is not rerun; each checkpointed layer call keeps a 5,056-byte CPU RNG state
  until its recomputation, counted with the activations). ``selective`` checkpoints every layer with a selective
  activation-checkpoint policy (:func:`batchpilot.measure.step.selective_policy`): matmul and attention-kernel outputs are
  saved, the s×s attention scores (Korthikanti et al. 2022 §4.2) and the cheap elementwise ops (norms,
  RoPE, SiLU, softmax) are recomputed — torchtitan's op-level selective policy. It therefore keeps less
  than Korthikanti's 34·s·b·h per layer.
- ``attention``: ``eager`` → ``attn_implementation="eager"`` (the s×s scores are materialised),
  ``flash`` → ``"sdpa"`` (on CPU ``_scaled_dot_product_flash_attention_for_cpu``, which keeps only the
  output and the fp32 log-sum-exp, as FlashAttention does on CUDA).
- ``optimizer``: ``adamw`` → ``torch.optim.AdamW``, ``sgd-momentum`` → ``torch.optim.SGD(momentum=0.9)``.
  ``adamw-8bit`` (bitsandbytes CUDA kernels) and ``adafactor`` (``torch.optim.Adafactor`` reads norms
  with ``.item()``, which fake tensors do not have) are errors that point at ``--method analytic``.
  The implementation is the trainer's (:func:`batchpilot.measure.step.optimizer_implementation`): fused
  on CPU and CUDA, which updates in place; ``optimizer_impl="foreach"`` traces torch's own multi-tensor
  default for CUDA instead (whole-model temporaries during ``step()``, which the trace then contains).
- Parallelism, ZeRO/FSDP sharding, offload and engines other than ``torch`` are not traced (one
  process, one device): an error that points at ``--method analytic``.

Known error against the CPU allocator (tiny-llama-1m, micro-batch 4, sequence 128): allocations made inside
a kernel are invisible to a dispatch-level tracer. With eager attention the trace is 32 bytes under
(scalars). With fp16 autocast and checkpointing the allocator's peak falls inside a Half ``aten::mm`` of
the backward, which allocates a 1.22 MiB scratch buffer beside its 128 KiB output and frees it before
returning: 149,260 bytes (0.7 %) above the trace (bf16 and fp32 ``mm`` allocate none; on CUDA cuBLAS
uses its workspace, a :class:`CudaTerms` term).

Category mapping of MemTracker's reference types (snapshot at the peak, so the categories sum to it):
Parameter + Buffer → ``weights``; Gradient → ``gradients``; Optstate → ``optimizer``; Activation and
Temp (tensors created during backward: gradients of activations, recomputed activations) →
``activations`` (temporaries are activations here, not overhead); Other (the input ids) and the
CUDA-only terms → ``overhead``. ``details`` holds each term separately: ``weights.parameters``,
``weights.buffers``, ``gradients.parameters``, ``optimizer.states``, ``activations.saved_and_forward``,
``activations.backward_temporaries``, ``overhead.inputs`` and the ``overhead.cuda_*`` terms.

CUDA-only terms (``target="cuda"``), added explicitly because fake *CUDA* tensors cannot run autograd on
a CPU-only torch build (the process aborts), see :class:`CudaTerms`: every storage rounded up to the
caching allocator's 512-byte blocks;
``overhead.cuda_context``, ``overhead.cublas_workspace``, ``overhead.nccl`` (0, one rank) and
``overhead.cuda_fragmentation_allowance``; with SDPA, attention dropout (GPT-2's ``attn_pdrop``) is
traced as 0 because FlashAttention applies it inside the kernel while CPU SDPA would fall back to the
math path and save the s×s scores (1.8 GB more for GPT-2 at sequence 1024). Known error of the CUDA estimate: CPU and CUDA autocast
cast a few ops differently; AdamW's ``step`` counters (one fp32 scalar per parameter tensor) live on
the CPU for CUDA parameters but are counted (< 0.001 % for a 7B model); fragmentation is an allowance,
not a trace.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from batchpilot.errors import SpecError
from batchpilot.estimate.breakdown import MemoryBreakdown
from batchpilot.measure.step import OptimizerImpl, TrainingStep, build_step, step_config

if TYPE_CHECKING:
    from batchpilot.specs.model import ModelSpec
    from batchpilot.specs.settings import RunSettings

Target = Literal["cpu", "cuda"]

_MIB = 2**20


@dataclass(frozen=True, kw_only=True, slots=True)
class CudaTerms:
    """Memory a CUDA process holds that a CPU trace cannot see; added to ``overhead`` for ``target="cuda"``."""

    block_bytes: int = 512
    """The caching allocator rounds every allocation up to a multiple of 512 bytes (``kMinBlockSize`` in
    c10/cuda/CUDACachingAllocator.cpp); ``torch.cuda.max_memory_allocated`` counts the rounded sizes.
    Applied to every traced storage, so the categories hold rounded sizes as ``max_memory_allocated``
    does (MemTracker's own rule for CUDA tensors)."""
    context_bytes: int = 512 * _MIB
    """CUDA context + kernel images loaded by torch: ≈ 0.3–1.3 GiB depending on the torch/CUDA version
    (CUDA ≥ 11.7 lazy module loading sits at the low end; 512 MiB is a mid-range H100/CUDA 12 figure).
    Not visible to ``max_memory_allocated``; visible to ``nvidia-smi`` and to OOM."""
    cublas_workspace_bytes: int = 32 * _MIB
    """cuBLAS workspace of the compute stream: 32 MiB on Hopper and Blackwell, 4096 KiB·2 + 16 KiB·8 ≈
    8.1 MiB on older GPUs (``parseChosenWorkspaceSize`` in aten/src/ATen/cuda/CublasHandlePool.cpp;
    ``CUBLAS_WORKSPACE_CONFIG`` overrides it). It comes from the caching allocator."""
    nccl_bytes: int = 0
    """NCCL communicator buffers: 0 for one traced rank; multi-GPU runs are the analytic model's job."""
    fragmentation_fraction: float = 0.05
    """Caching-allocator slack (reserved − allocated) as a fraction of the traced allocated peak: not
    traceable (it depends on the allocation history of segments), so an allowance — the same 5 % default
    as the analytic model's ``OverheadModel.fragmentation_fraction`` (typical 3–10 %)."""

    def __post_init__(self) -> None:
        for name in ("block_bytes", "context_bytes", "cublas_workspace_bytes", "nccl_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SpecError(f"CUDA term {name} {value!r} must be a non-negative integer")
        if not 0.0 <= self.fragmentation_fraction < 1.0:
            raise SpecError(f"CUDA term fragmentation_fraction {self.fragmentation_fraction!r} must be in [0, 1)")


@dataclass(frozen=True, kw_only=True, slots=True)
class TraceResult:
    """What one traced training step found."""

    memory: MemoryBreakdown
    """Categories at the moment of the peak (they sum to the peak), plus CUDA terms for ``target="cuda"``."""
    flops: int
    """FLOPs of one training step (forward, backward, recomputation); 0 when not counted."""
    category_max_bytes: dict[str, int] = field(default_factory=dict)
    """The largest value each category reached at any time in the step (these need not coincide:
    gradients are largest after backward, activations before it)."""
    wall_s: float = 0.0
    """Seconds the trace took on this machine."""


# ---------------------------------------------------------------------------------------------- public API
def traced_memory(
    model: ModelSpec, settings: RunSettings, *, micro_batch: int, seq_len: int, target: Target = "cpu",
) -> MemoryBreakdown:
    """Peak memory of one training step of ``model`` on one device, by fake-tensor execution."""
    return trace_step(model, settings, micro_batch=micro_batch, seq_len=seq_len, target=target,
                      count_flops=False).memory


def traced_flops(
    model: ModelSpec, settings: RunSettings, *, micro_batch: int, seq_len: int, target: Target = "cpu",
) -> int:
    """FLOPs of one training step as the real module executes them (``FlopCounterMode``).

    Comparable with ``model.flops_per_token(seq_len) × micro_batch × seq_len``; differences: torch counts
    the attention backward with the score recomputation FlashAttention does (5 instead of 4 score-sized
    matmuls), full recompute adds one forward, and elementwise ops are not counted by either.
    """
    return trace_step(model, settings, micro_batch=micro_batch, seq_len=seq_len, target=target,
                      count_flops=True, track_memory=False).flops


def trace_step(
    model: ModelSpec, settings: RunSettings, *, micro_batch: int, seq_len: int, target: Target = "cpu",
    count_flops: bool = True, track_memory: bool = True, cuda_terms: CudaTerms | None = None,
    optimizer_impl: OptimizerImpl | None = None,
) -> TraceResult:
    """Trace two training iterations (memory) and one (FLOPs) of ``model`` with ``settings``.

    ``optimizer_impl`` overrides the trainer's optimizer implementation for ``target``
    (:func:`batchpilot.measure.step.optimizer_implementation`: fused); ``cuda_terms`` overrides
    :class:`CudaTerms` for ``target="cuda"``.
    """
    check_traceable(model, settings, micro_batch=micro_batch, seq_len=seq_len, target=target)
    from torch._subclasses.fake_tensor import FakeTensorMode

    terms = cuda_terms or CudaTerms()
    start = time.perf_counter()
    with _quiet(), _unpacked_rows(), FakeTensorMode(allow_non_fake_inputs=True):
        step = build_step(model.hf_config, step_config(settings, optimizer_impl), micro_batch=micro_batch,
                          seq_len=seq_len, name=model.name, dropout_in_attention_kernel=target == "cuda")
        try:
            memory, maxima = (
                _track_memory(step, target, terms) if track_memory
                else (MemoryBreakdown(weights_bytes=0, gradients_bytes=0, optimizer_bytes=0,
                                      activations_bytes=0, overhead_bytes=0), {})
            )
            flops = _count_flops(step) if count_flops else 0
        except (RuntimeError, NotImplementedError) as exc:  # an op with no fake-tensor kernel for this model
            # (transformers 5's MoE grouped_mm meta kernel wants bf16 inputs; the trace runs fp32 weights)
            detail = " ".join(str(exc).split())[:200]
            raise SpecError(f"{model.name} cannot be traced ({type(exc).__name__}: {detail}); "
                            f"use --method analytic") from None
    return TraceResult(memory=memory, flops=flops, category_max_bytes=maxima,
                       wall_s=time.perf_counter() - start)


def check_traceable(
    model: ModelSpec, settings: RunSettings, *, micro_batch: int, seq_len: int, target: str = "cpu",
) -> None:
    """Raise a one-line :class:`SpecError` for settings a one-process CPU trace cannot reproduce."""
    if target not in ("cpu", "cuda"):
        raise SpecError(f"traced target {target!r} is not one of: cpu, cuda")
    for name, value in (("micro-batch", micro_batch), ("seq-len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecError(f"--{name} {value!r} must be a positive integer")
    if seq_len > model.max_position_embeddings:
        raise SpecError(f"--seq-len {seq_len} exceeds the {model.max_position_embeddings} positions of "
                        f"{model.name}; use --seq-len ≤ {model.max_position_embeddings}")
    if model.is_moe:
        raise SpecError(f"{model.name} is a mixture of experts, which a fake-tensor trace cannot run (its routing has "
                        "data-dependent shapes, and transformers' grouped_mm kernel takes bf16 only); "
                        "use --method analytic")
    if settings.precision == "fp8":
        raise SpecError("--precision fp8 cannot be traced (Transformer-Engine fp8 kernels do not exist on CPU); "
                        "use --method analytic or --precision bf16")
    if settings.optimizer == "adamw-8bit":
        raise SpecError("--optimizer adamw-8bit cannot be traced (bitsandbytes 8-bit states are CUDA kernels); "
                        "use --method analytic or --optimizer adamw")
    if settings.optimizer == "adafactor":
        raise SpecError("--optimizer adafactor cannot be traced (torch's Adafactor step reads tensor values "
                        "with .item(), which fake tensors do not have); use --method analytic")
    distributed = {"--engine": settings.engine != "torch", "--zero": settings.zero_stage != 0,
                   "--tp": settings.tp != 1, "--pp": settings.pp != 1, "--ep": settings.ep != 1,
                   "--sp": settings.sp, "--offload": settings.offload, "--hybrid-shard": settings.hybrid_shard}
    used = [flag for flag, on in distributed.items() if on]
    if used:
        raise SpecError(f"{', '.join(used)} cannot be traced (the trace runs one process with --engine torch, "
                        "no sharding or model parallelism); use --method analytic")


# ---------------------------------------------------------------------------------------------- tracking
_CATEGORY = {
    "Parameter": ("weights", "weights.parameters"),
    "Buffer": ("weights", "weights.buffers"),
    "Gradient": ("gradients", "gradients.parameters"),
    "Optstate": ("optimizer", "optimizer.states"),
    "Activation": ("activations", "activations.saved_and_forward"),
    "Temp": ("activations", "activations.backward_temporaries"),
    "Other": ("overhead", "overhead.inputs"),
}


def _track_memory(step: TrainingStep, target: str, terms: CudaTerms) -> tuple[MemoryBreakdown, dict[str, int]]:
    """Two iterations under MemTracker; the categories of the peak snapshot, and each category's maximum."""
    from torch.distributed._tools import mem_tracker as mt_module

    with _block_rounding(mt_module, terms.block_bytes if target == "cuda" else 1):
        tracker = _global_peak_tracker(mt_module)
        tracker.track_external(step.module, step.optimizer, step.input_ids)
        rng_states = _tracked_rng_states(tracker) if target == "cpu" else contextlib.nullcontext()
        with rng_states, tracker:
            step.run()
            tracker.reset_mod_stats()
            step.run()
        peak = tracker.get_tracker_snapshot("peak")
    snapshot: dict[Any, int] = next(iter(peak.values()), {})
    details: dict[str, int] = {}
    categories = dict.fromkeys(("weights", "gradients", "optimizer", "activations", "overhead"), 0)
    for reftype, nbytes in snapshot.items():
        key = getattr(reftype, "value", reftype)
        if key in _CATEGORY and nbytes:
            category, detail = _CATEGORY[key]
            categories[category] += nbytes
            details[detail] = details.get(detail, 0) + nbytes
    if target == "cuda":
        _add_cuda_terms(categories, details, terms)
    memory = MemoryBreakdown(
        weights_bytes=categories["weights"], gradients_bytes=categories["gradients"],
        optimizer_bytes=categories["optimizer"], activations_bytes=categories["activations"],
        overhead_bytes=categories["overhead"], details=details,
    )
    maxima = {_CATEGORY[k][1]: v for k, v in tracker.category_max_bytes.items() if k in _CATEGORY}
    return memory, maxima


def _add_cuda_terms(categories: dict[str, int], details: dict[str, int], terms: CudaTerms) -> None:
    """Add :class:`CudaTerms` to ``overhead`` (the fragmentation allowance is a fraction of the traced peak)."""
    fragmentation = round(sum(categories.values()) * terms.fragmentation_fraction)
    for name, nbytes in (("overhead.cuda_context", terms.context_bytes),
                         ("overhead.cublas_workspace", terms.cublas_workspace_bytes),
                         ("overhead.nccl", terms.nccl_bytes),
                         ("overhead.cuda_fragmentation_allowance", fragmentation)):
        if nbytes:
            categories["overhead"] += nbytes
            details[name] = nbytes


def _global_peak_tracker(mt_module: Any) -> Any:
    """A MemTracker that keeps only the process-wide peak and each reference type's maximum.

    MemTracker's own ``_update_peak_stats`` also refreshes the peak of every active module, walking all
    tracked modules after every op: O(ops × modules), minutes for a 7B model. The process-wide peak
    snapshot is computed the same way as there.
    """
    total_key = mt_module._TOTAL_KEY

    class _GlobalPeakTracker(mt_module.MemTracker):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.category_max_bytes: dict[str, int] = {}

        def _update_peak_stats(self, peak_state: Any) -> None:
            maxima = self.category_max_bytes
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap[total_key]:
                    self._peak_mem[dev] = snap[total_key]
                    self._peak_mem_snap[dev] = dict(snap)
                for reftype, nbytes in snap.items():
                    key = getattr(reftype, "value", reftype)
                    if nbytes > maxima.get(key, 0):
                        maxima[key] = nbytes

        def track_host_tensor(self, tensor: Any) -> None:
            """Count a real tensor made outside the dispatcher (so no op shows it to this mode), with the
            reference type ``__torch_dispatch__`` gives an op's output at this point of the step."""
            if self._in_opt:
                reftype = mt_module._MemRefType.OPT
            elif self._mod_tracker.is_bw and not self._in_ac:
                reftype = mt_module._MemRefType.TEMP
            else:
                reftype = mt_module._MemRefType.ACT
            self._track(reftype, tensor)
            self._update_peak_stats(None)

        def _track_module_params_and_buffers(self, module: Any, install_grad_hooks: bool = True) -> Any:
            # frozen parameters (fine-tuning) take no gradient hooks (register_hook refuses them); their
            # trainable submodules (LoRA's A and B) install their own
            frozen = any(not p.requires_grad for p in module.parameters())
            return super()._track_module_params_and_buffers(module, install_grad_hooks=install_grad_hooks and not frozen)

    return _GlobalPeakTracker()


@contextlib.contextmanager
def _tracked_rng_states(tracker: Any) -> Iterator[None]:
    """Count the CPU generator states that checkpointing stashes: real allocations no op dispatches.

    Non-reentrant ``torch.utils.checkpoint`` (``preserve_rng_state=True``, the default) keeps
    ``torch.get_rng_state()`` — a 5,056-byte uint8 tensor on torch 2.13 — per checkpointed layer call from
    its forward until its recomputation is done, and ``torch.random.fork_rng`` takes one more around each
    recomputation. ``default_generator.get_state()`` allocates in C++ without the dispatcher, so it is a
    real CPU tensor even under ``FakeTensorMode`` and MemTracker never sees it; the CPU allocator does.
    Wrapping ``torch.get_rng_state`` (looked up at call time by both) hands each state to the tracker,
    whose weak reference then frees it when checkpointing drops it, as it would a saved tensor.
    """
    import torch

    original = torch.get_rng_state

    def get_rng_state() -> Any:
        state = original()
        tracker.track_host_tensor(state)
        return state

    torch.get_rng_state = get_rng_state
    try:
        yield
    finally:
        torch.get_rng_state = original


@contextlib.contextmanager
def _unpacked_rows() -> Iterator[None]:
    """Answer ``transformers``' packed-sequence check as it is answered for the traced step's real tensors.

    Without a KV cache (``use_cache`` is turned off under gradient checkpointing) ``create_causal_mask``
    asks ``masking_utils.find_packed_sequence_indices(position_ids)`` whether the rows hold several
    packed documents; that reads tensor values, so under fake tensors (``is_tracing``) it always answers
    "packed". The mask is then a materialised ``b × 1 × s × s`` block-causal mask instead of SDPA's
    ``is_causal``, and SDPA with a mask repeats grouped-query K/V to every head: measured (tiny-llama-1m,
    fp32, micro-batch 32, sequence 512, full recompute) +16.8 % on the traced peak. The traced step
    passes only ``input_ids``, so the model's position ids are 0 … s−1 in every row — one document per
    row, for which the real check returns ``None``. The wrapper runs the check (its small temporaries
    are the real step's) and returns that answer.
    """
    try:
        from transformers import masking_utils
    except ImportError:  # pragma: no cover - transformers is a dependency of the trace
        yield
        return
    original = getattr(masking_utils, "find_packed_sequence_indices", None)
    if original is None:  # a transformers without the check builds the same mask either way
        yield
        return

    def find_packed_sequence_indices(position_ids: Any) -> None:
        original(position_ids)

    masking_utils.find_packed_sequence_indices = find_packed_sequence_indices
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


@contextlib.contextmanager
def _block_rounding(mt_module: Any, block_bytes: int) -> Iterator[None]:
    """Make MemTracker round every storage up to ``block_bytes`` (its CUDA rule, applied to fake CPU tensors)."""
    if block_bytes <= 1:
        yield
        return
    base = mt_module._WeakRefInfo

    class _Rounded(base):  # type: ignore[misc, valid-type]
        def _calculate_mem_consumed(self) -> int:
            return math.ceil(self.size * self.element_size / block_bytes) * block_bytes

    mt_module._WeakRefInfo = _Rounded
    try:
        yield
    finally:
        mt_module._WeakRefInfo = base


def _count_flops(step: TrainingStep) -> int:
    """FLOPs of one iteration (the optimizer's elementwise work is not counted, as usual)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas()) as counter:
        step.run()
    return int(counter.get_total_flops())


@functools.cache
def _cpu_attention_formulas() -> dict[Any, Callable[..., int]]:
    """FlopCounterMode formulas for the CPU flash-attention kernels, reusing torch's SDPA shape formulas.

    ``_scaled_dot_product_flash_attention_for_cpu(q, k, v, ...)`` computes what the CUDA flash kernel does:
    QKᵀ and PV, 2·b·h·s_q·s_k·(d_qk + d_v) FLOPs forward; its backward recomputes the scores (5 matmuls).
    FlopCounterMode passes shapes (tensors replaced by their ``.shape``) to these functions.
    """
    import torch
    from torch.utils import flop_counter

    def forward(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return int(flop_counter.sdpa_flop_count(q, k, v))

    def backward(grad_out: Any, q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return int(flop_counter.sdpa_backward_flop_count(grad_out, q, k, v))

    aten = torch.ops.aten
    return {
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    }


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the deprecation and fake-tensor warnings ``transformers`` and torch raise while tracing."""
    from transformers.utils import logging as hf_logging

    # transformers' config checks ("bos_token_id must be … within the vocabulary") and torch's fake-tensor
    # errors ("failed while attempting to run meta for …") are logged, not warned: extra stderr lines
    fake_logger = logging.getLogger("torch._subclasses.fake_tensor")
    verbosity, fake_level = hf_logging.get_verbosity(), fake_logger.level
    hf_logging.set_verbosity_error()
    fake_logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        fake_logger.setLevel(fake_level)


def peak_error(traced: int, measured: int) -> float:
    """Relative error of a traced peak against a measured one: (traced − measured) / measured."""
    return (traced - measured) / measured if measured else math.inf
