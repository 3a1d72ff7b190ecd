"""batchpilot from Python: memory and plans as the CLI's typed values, and the prediction-seeded batch-size
search for an existing training script.

    >>> import batchpilot.api as bp
    >>> m = bp.memory("qwen2.5-7b", seq_len=4096, micro_batch=1, finetune="qlora,r=16", recompute="full")
    >>> round(m.weights_bytes / 2**30, 1), m.total_bytes < 20 * 2**30   # GiB per GPU: a 4-bit base, fits 24 GB
    (5.3, True)
    >>> record = bp.plan("qwen2.5-7b", gpu="h100-sxm", seq_len=4096, global_batch=16, finetune="lora",
    ...                  epochs=1, dataset_tokens=50_000_000, price_per_gpu_hour=2.5)
    >>> record.best.micro_batch, record.best.grad_accum, round(record.cost.gpu_hours, 1)
    (1, 16, 1.2)
    >>> modes = bp.compare_finetune("qwen2.5-7b", gpu="h100-sxm", seq_len=4096, global_batch=16)
    >>> [m.name for m in modes if m.fits and m.name in ("full", "lora", "qlora")]
    ['lora', 'qlora']

The batch-size search for your own step (:func:`find_batch_size`): like Lightning's ``BatchSizeFinder`` and
accelerate's ``find_executable_batch_size``, it calls your function with a micro-batch size and treats an
out-of-memory error as "does not fit" — but it starts at the memory model's prediction for your model and
settings, so an exact prediction is confirmed in 2 trials (p fits, p + 1 does not), where the power/binary
searches of those tools take 5–17 (``benchmarks/results/probe_vs_finders.md``). On CUDA the budget caps the caching
allocator (``torch.cuda.set_per_process_memory_fraction``) and its reserved peak is measured; on CPU each
trial's allocator peak is measured with the torch profiler and a trial over the budget does not fit (in-process
CPU out-of-memory is not reliably recoverable; ``batchpilot probe`` runs each CPU trial in its own process)::

    def one_step(micro_batch: int) -> None:           # your code: a forward/backward/step at this size
        ids = torch.randint(0, vocab, (micro_batch, 256))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step(); optimizer.zero_grad(set_to_none=True)

    result = bp.find_batch_size(one_step, model="tiny-llama-1m", seq_len=256, budget_bytes=2**30, device="cpu",
                                module=model, optimizer=optimizer)
    result.max_micro_batch, result.trials

:func:`find_executable_batch_size` is the decorator form (accelerate's shape): your whole training function runs
at the predicted size, and again smaller only if it runs out of memory.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from batchpilot.errors import BatchpilotError, SpecError
from batchpilot.estimate.breakdown import MemoryBreakdown
from batchpilot.estimate.memory import analytic_memory, max_micro_batch
from batchpilot.estimate.overhead import OverheadModel
from batchpilot.measure.search import Outcome, SearchStep, search_max_micro_batch
from batchpilot.plan.cost import budget_tokens, training_cost
from batchpilot.plan.finetune import compare_modes
from batchpilot.plan.options import PlanOptions, plan_record, prepare_plan
from batchpilot.plan.planner import plan as _plan
from batchpilot.records.cost import FineTuneMode
from batchpilot.records.plan import PlanRecord
from batchpilot.specs.finetune import FULL, parse_finetune
from batchpilot.specs.model import ModelSpec, load_model
from batchpilot.specs.settings import RunSettings

R = TypeVar("R")
STEPS_PER_TRIAL = 2
"""Steps per trial: the first step creates the optimizer state after its activations are freed, so only the second
holds state, gradients and activations together (the training peak; ``batchpilot.measure._trial``)."""
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory", "bad_alloc")


def _model(model: str | ModelSpec) -> ModelSpec:
    return model if isinstance(model, ModelSpec) else load_model(model)


def _settings(settings: RunSettings | None, finetune: str | None, overrides: dict[str, Any]) -> RunSettings:
    base = settings or RunSettings()
    if overrides:
        base = replace(base, **overrides)
    return replace(base, finetune=parse_finetune(finetune)) if finetune else base


# ---------------------------------------------------------------------------------------------- memory, plan
def memory(model: str | ModelSpec, *, seq_len: int, micro_batch: int, settings: RunSettings | None = None,
           finetune: str | None = None, dp: int = 1, grad_accum: int = 1, overhead: OverheadModel | None = None,
           **setting: Any) -> MemoryBreakdown:
    """Per-GPU memory of one step (``batchpilot memory``'s analytic model): ``settings`` or
    :class:`~batchpilot.specs.settings.RunSettings` fields as keywords (``recompute="full"``), ``finetune`` as
    ``--finetune`` text."""
    return analytic_memory(_model(model), _settings(settings, finetune, setting), micro_batch=micro_batch,
                           seq_len=seq_len, dp=dp, grad_accum=grad_accum, overhead=overhead)


def plan(model: str | ModelSpec, *, gpu: str, seq_len: int, gpus: int = 1, finetune: str | None = None,
         epochs: float | None = None, dataset_tokens: int | None = None, price_per_gpu_hour: float | None = None,
         **options: Any) -> PlanRecord:
    """``batchpilot plan``: the ranked plans as the ``plan --json`` record, with the run's time and cost when a
    budget is given (``train_tokens``, or ``epochs`` × ``dataset_tokens``). ``options``: the other
    :class:`~batchpilot.plan.options.PlanOptions` fields (``global_batch``, ``engine``, ``pins``, ...)."""
    prepared = prepare_plan(PlanOptions(model=model, gpu=gpu, seq_len=seq_len, gpus=gpus, **options))
    if finetune:
        request = prepared.request
        prepared = replace(prepared, request=replace(request, settings=replace(
            request.settings, finetune=parse_finetune(finetune))))
    result = _plan(prepared.request)
    record = plan_record(prepared, result)
    budget = budget_tokens(train_tokens=options.get("train_tokens"), epochs=epochs, dataset_tokens=dataset_tokens)
    if budget is None:
        return record
    cost = training_cost(tokens_per_s=result.plans[0].step.tokens_per_s, gpus=prepared.request.cluster.total_devices,
                         train_tokens=budget[0], tokens_source=budget[1], price_per_gpu_hour=price_per_gpu_hour)
    return replace(record, cost=cost)


def compare_finetune(model: str | ModelSpec, *, gpu: str, seq_len: int, gpus: int = 1,
                     **options: Any) -> tuple[FineTuneMode, ...]:
    """``plan --finetune compare``: full training, 8-bit AdamW, pure bf16, LoRA and QLoRA planned side by side."""
    prepared = prepare_plan(PlanOptions(model=model, gpu=gpu, seq_len=seq_len, gpus=gpus, **options))
    return compare_modes(prepared.request)


# ---------------------------------------------------------------------------------------------- batch size
@dataclass(frozen=True, kw_only=True, slots=True)
class BatchSizeResult:
    """What :func:`find_batch_size` established."""

    max_micro_batch: int
    """Largest micro-batch whose trial fitted (0: none)."""
    predicted_max_micro_batch: int
    """The memory model's prediction the search started from."""
    trials: tuple[SearchStep, ...]
    """Every trial in order (size, fits, measured peak, the search rule that chose it)."""

    @property
    def num_trials(self) -> int:
        return len(self.trials)


def predict_max_micro_batch(model: str | ModelSpec, *, seq_len: int, budget_bytes: int,
                            settings: RunSettings | None = None, finetune: str | None = None, device: str = "cuda",
                            **setting: Any) -> int:
    """The analytic model's largest micro-batch whose step fits ``budget_bytes`` on ``device`` (CPU: no CUDA
    terms; CUDA: the caching allocator's terms, no context — a budget caps the allocator, not the GPU)."""
    overhead = OverheadModel.cpu() if device == "cpu" else OverheadModel(cuda_context_bytes=0)
    return max_micro_batch(_model(model), _settings(settings, finetune, setting), seq_len=seq_len,
                           budget_bytes=budget_bytes, overhead=overhead)


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocator failure (``torch.OutOfMemoryError``, CPU "can't allocate memory"), not another error."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MESSAGES)


def find_batch_size(step: Callable[[int], object], *, model: str | ModelSpec, seq_len: int,
                    budget_bytes: int | None = None, settings: RunSettings | None = None,
                    finetune: str | None = None, device: str = "cuda", prediction: int | None = None,
                    module: Any = None, optimizer: Any = None, cap: int = 1 << 16,
                    **setting: Any) -> BatchSizeResult:
    """The largest micro-batch your ``step(micro_batch)`` runs within ``budget_bytes`` (CUDA default: the free
    device memory), searched from the memory model's prediction for ``model`` and the run settings
    (:mod:`batchpilot.measure.search`'s policy: an exact prediction takes 2 trials). ``step`` should run what a
    training step holds at its peak (forward, backward and the optimizer step, with optimizer state).

    On CPU pass your ``module`` and ``optimizer``: a trial's peak is what they hold when it starts (parameters,
    gradients, optimizer state) plus the most the step allocates beyond that (the torch profiler's allocator
    records) — the whole step's memory, as the prediction counts it."""
    import torch

    if device not in ("cpu", "cuda"):
        raise SpecError(f"device {device!r} is not cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise SpecError("device 'cuda' but torch sees no CUDA device; use device='cpu' with a budget_bytes")
    if budget_bytes is None:
        if device == "cpu":
            raise SpecError("on CPU give budget_bytes (the memory a step may use)")
        budget_bytes = int(torch.cuda.mem_get_info()[0])
    predicted = prediction if prediction is not None else predict_max_micro_batch(
        model, seq_len=seq_len, budget_bytes=budget_bytes, settings=settings, finetune=finetune, device=device,
        **setting)
    if device == "cpu" and module is None:
        raise SpecError("on CPU pass module= (and optimizer=): a trial's peak counts what they hold")

    def trial(b: int) -> Outcome:
        if device == "cuda":
            return _cuda_trial(step, b, budget_bytes)
        return _cpu_trial(step, b, budget_bytes, _resident_bytes(module, optimizer))

    result = search_max_micro_batch(predicted, trial, budget_bytes=budget_bytes, cap=cap)
    return BatchSizeResult(max_micro_batch=result.max_micro_batch, predicted_max_micro_batch=predicted,
                           trials=result.steps)


def _resident_bytes(module: Any, optimizer: Any) -> int:
    """Bytes of the distinct storages of ``module``'s parameters and gradients and ``optimizer``'s state."""
    import torch

    tensors = [p for p in module.parameters()] + [p.grad for p in module.parameters() if p.grad is not None]
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _cpu_trial(step: Callable[[int], object], micro_batch: int, budget_bytes: int, resident: int) -> Outcome:
    """Run ``step`` under the torch profiler; ``resident`` + its allocator peak above what was live before is the
    trial's peak."""
    from torch.profiler import ProfilerActivity, profile

    from batchpilot.measure.cpu_peak import allocation_records, flatten_events, live_bytes

    gc.collect()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for _ in range(STEPS_PER_TRIAL):
                step(micro_batch)
    except BaseException as exc:
        if is_out_of_memory(exc):
            return Outcome(fits=False)
        raise
    events = flatten_events(prof.profiler.kineto_results.experimental_event_tree())  # type: ignore[union-attr]
    peak = resident + max((live for _, live in live_bytes(allocation_records(events))), default=0)
    return Outcome(fits=peak <= budget_bytes, peak_bytes=peak)


def _cuda_trial(step: Callable[[int], object], micro_batch: int, budget_bytes: int) -> Outcome:
    """Run ``step`` with the caching allocator capped at ``budget_bytes``; OOM means it does not fit."""
    import torch

    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total))
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        for _ in range(STEPS_PER_TRIAL):
            step(micro_batch)
        torch.cuda.synchronize()
    except BaseException as exc:
        if not is_out_of_memory(exc):
            raise
        gc.collect()
        torch.cuda.empty_cache()
        return Outcome(fits=False)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    return Outcome(fits=True, peak_bytes=int(torch.cuda.max_memory_reserved()))


def find_executable_batch_size(*, model: str | ModelSpec, seq_len: int, budget_bytes: int,
                               settings: RunSettings | None = None, finetune: str | None = None,
                               device: str = "cuda", **setting: Any
                               ) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Decorator (accelerate's ``find_executable_batch_size`` shape): the function receives the batch size as its
    first argument and runs at the memory model's prediction; on an out-of-memory error it runs again one
    smaller, then at half the failed size (the search's step-down and halving rules), until it completes."""
    predicted = predict_max_micro_batch(model, seq_len=seq_len, budget_bytes=budget_bytes, settings=settings,
                                        finetune=finetune, device=device, **setting)

    def decorate(function: Callable[..., R]) -> Callable[..., R]:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> R:
            size, failures = max(predicted, 1), 0
            while True:
                try:
                    return function(size, *args, **kwargs)
                except BaseException as exc:
                    if not is_out_of_memory(exc) or size == 1:
                        raise
                failures += 1
                gc.collect()
                size = size - 1 if failures == 1 else max(1, size // 2)

        return wrapper

    return decorate


__all__ = [
    "FULL",
    "BatchSizeResult",
    "BatchpilotError",
    "Outcome",
    "compare_finetune",
    "find_batch_size",
    "find_executable_batch_size",
    "is_out_of_memory",
    "memory",
    "plan",
    "predict_max_micro_batch",
]
