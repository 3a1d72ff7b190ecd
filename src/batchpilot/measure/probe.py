"""Probe: real training steps of the real model on the real device — max micro-batch, peak memory,
tokens/s per micro-batch, the throughput knee, and a calibration for the planner.

Examples::

    batchpilot probe --model tiny-llama-1m --seq-len 256 --memory-budget 512MiB --device cpu
    batchpilot probe --model ./config.json --seq-len 4096 --precision bf16 --recompute full --json

Flow (:func:`run_probe`):

1. *Prediction*: the analytic memory model's largest micro-batch under the budget
   (:func:`batchpilot.estimate.memory.max_micro_batch`; injectable).
2. *Size search* (:mod:`batchpilot.measure.search`): the prediction first, then the guided /
   bracketing policy; every trial reports its measured peak, so the typical case needs 2–3 trials.
3. *Knee*: tokens/s is measured at every trial; to see the curve below the maximum the probe adds the
   halving ladder ``max/2, max/4, …, 1`` (sizes not measured yet). The knee is the smallest measured
   size within 3 % of the best tokens/s (:func:`find_knee`) — on CPUs throughput peaks and then falls
   as the micro-batch grows, so the largest size that fits is not the fastest.
4. *Calibration*: efficiency vs tokens per micro-batch and the memory the analytic model missed
   (:func:`calibration_from_probe`), in the format :mod:`batchpilot.estimate.calibration` reads.

Trials (:class:`CpuTrialRunner`, :class:`CudaTrialRunner`): on CPU each trial is its own process
forked from a fork server that has torch and transformers imported already; it sets its own
``RLIMIT_AS`` to baseline + budget (details in :mod:`batchpilot.measure._trial`), runs in its own
process group, and is killed with that group on timeout or interrupt, so nothing is left behind. On
CUDA trials run in this process: OOM is caught and freed, and under torchrun the ranks agree.

Calling :func:`run_probe` from a script: as with any ``multiprocessing`` start method other than
``fork``, each trial process imports the script's main module, so guard the call with
``if __name__ == "__main__":``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from batchpilot.errors import BatchpilotError, InfeasibleError
from batchpilot.measure.search import DEFAULT_CAP, Outcome, search_max_micro_batch
from batchpilot.measure.trace import TRACE_ENV, trace

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from batchpilot.estimate.calibration import Calibration
    from batchpilot.specs.model import ModelSpec
    from batchpilot.specs.settings import RunSettings

Device = Literal["cpu", "cuda"]
Phase = Literal["search", "knee"]

KNEE_TOLERANCE = 0.03
"""A size is "as fast" as the best when its tokens/s is within 3 % of the best measured (a stated rule: two sizes within 3 % are as fast within the noise of one timed step)."""
DEFAULT_TRIAL_TIMEOUT_S = 1800.0
TIMEOUT_ERROR_PREFIX = "trial ran past --trial-timeout"
"""How a timed-out trial's ``error`` starts (the report and the nothing-fits message recognise it)."""
CPU_TRIAL_OVERHEAD_BYTES = 6 * 2**20
"""Address-space growth of a CPU trial that the analytic model does not count (autograd graph, Python
heap, page rounding of each mmapped buffer): measured 3.1–6.0 MiB over tiny-llama-1m trials at
sequence 64 and 128, micro-batch 1–14 (torch 2.13 CPU, this module's trial). Subtracted from the budget
for the prediction only, so the first trial is not one size too large."""


class ProbeError(BatchpilotError):
    """A probe trial failed for a reason other than memory (crash, timeout, unsupported setting)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ProbeTrial:
    """One real trial (JSON keys: the field names)."""

    micro_batch: int
    fits: bool
    peak_bytes: int | None
    """CPU: address-space growth over the trial process's baseline; CUDA: peak reserved by the allocator."""
    tokens_per_s: float | None
    """Fastest timed step's ``micro_batch × seq_len / seconds``; None when it did not fit."""
    seconds: float
    """Wall time of the whole trial (process start, model build, all steps)."""
    phase: Phase = "search"
    """``search`` (part of the size search) or ``knee`` (a throughput point below the maximum)."""
    error: str | None = None
    """The allocator's message when it did not fit."""
    peak_source: str | None = None
    """How ``peak_bytes`` was measured: ``address-space`` or ``address-space-upper-bound`` (CPU, see
    :mod:`batchpilot.measure._trial`), ``allocator`` (CUDA)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "micro_batch": self.micro_batch, "fits": self.fits, "peak_bytes": self.peak_bytes,
            "tokens_per_s": self.tokens_per_s, "seconds": self.seconds, "phase": self.phase,
            "error": self.error, "peak_source": self.peak_source,
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class ProbeRequest:
    """What to probe: model, settings, sequence length, device and budget."""

    model: ModelSpec
    settings: RunSettings
    seq_len: int
    """Worst-case sequence length of the data (see :func:`worst_case_seq_len`)."""
    device: Device = "cpu"
    budget_bytes: int
    """CPU: memory allowed above the trial process's baseline (imports, model, optimizer object).
    CUDA: the caching allocator's cap (everything the step allocates, model included)."""
    warmup_steps: int = 1
    """Untimed full steps first. The optimizer state is created before them, inside the budget
    (``_trial.materialise_optimizer_state``), so every step holds state, gradients and activations."""
    timed_steps: int = 1
    """Timed full steps after the warm-up. A size fits when all ``warmup + timed`` (≥ 2) steps ran: the
    second step's peak can exceed the first's (glibc's small-allocation heap grows between steps; measured
    in :mod:`batchpilot.measure._trial`'s docstring), so one step is not a fit."""
    knee: bool = True
    """Add the halving ladder below the maximum to locate the throughput knee."""
    trial_timeout_s: float = DEFAULT_TRIAL_TIMEOUT_S
    cap: int = DEFAULT_CAP
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("seq_len", "budget_bytes", "warmup_steps", "timed_steps", "cap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BatchpilotError(f"probe {name} must be a positive integer, got {value!r}")
        if self.warmup_steps + self.timed_steps < 2:
            raise BatchpilotError(f"probe warmup {self.warmup_steps} + timed {self.timed_steps} steps < 2: a size "
                                  "fits only after a step with optimizer state; use 2 or more steps in all")
        if self.seq_len > self.model.max_position_embeddings:
            raise BatchpilotError(
                f"--seq-len {self.seq_len} exceeds {self.model.name}'s max_position_embeddings "
                f"{self.model.max_position_embeddings}; use --seq-len ≤ {self.model.max_position_embeddings}")
        check_supported(self.settings, self.device)


@dataclass(frozen=True, kw_only=True, slots=True)
class ProbeResult:
    """The probe's findings (``batchpilot probe --json`` contract: :meth:`to_dict`)."""

    max_micro_batch: int
    knee_micro_batch: int
    predicted_max_micro_batch: int
    search_trials: int
    """Trials the size search took (the knee's extra trials are not counted)."""
    trials: tuple[ProbeTrial, ...]
    device: str
    budget_bytes: int
    model: str
    seq_len: int
    wall_seconds: float
    search_seconds: float
    """Wall time of the size search alone."""
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_micro_batch": self.max_micro_batch,
            "knee_micro_batch": self.knee_micro_batch,
            "predicted_max_micro_batch": self.predicted_max_micro_batch,
            "search_trials": self.search_trials,
            "trials": [t.to_dict() for t in self.trials],
            "device": self.device,
            "budget_bytes": self.budget_bytes,
            "model": self.model,
            "seq_len": self.seq_len,
            "wall_seconds": self.wall_seconds,
            "search_seconds": self.search_seconds,
            "settings": dict(self.settings),
        }


class TrialRunner(Protocol):
    """Runs one real trial of ``micro_batch`` sequences."""

    def __call__(self, micro_batch: int) -> ProbeTrial: ...


@dataclass(frozen=True, kw_only=True, slots=True)
class Prediction:
    """What the memory model expects before any trial."""

    max_micro_batch: int
    """Largest micro-batch expected to fit: the search's first trial."""
    bytes_per_sequence: float | None = None
    """Memory one more sequence costs, near that size; shapes the search's first guided step."""


Predictor = Callable[["ProbeRequest"], "Prediction | int"]
"""The prediction that seeds the search (an int is a size without a slope)."""


# ---------------------------------------------------------------------------- small pure helpers
def check_supported(settings: RunSettings, device: str) -> None:
    """Settings a real single-device step can run here; the rest are one-line errors with the fix."""
    unsupported = {
        "precision": ("fp8",) if device == "cuda" else ("fp8", "fp16"),
        "optimizer": ("adamw-8bit", "adafactor"),
        "recompute": ("selective",),
    }
    for name, bad in unsupported.items():
        value = getattr(settings, name)
        if value in bad:
            raise ProbeError(f"probe cannot run --{name} {value} on {device} (needs a kernel stack that a "
                             f"plain PyTorch step does not have); probe with another --{name}")
    layout = {"tp": settings.tp, "pp": settings.pp, "ep": settings.ep, "zero": settings.zero_stage}
    if any(v not in (0, 1) for v in layout.values()) or settings.offload:
        raise ProbeError(f"probe runs one device without model sharding; got {layout}, offload="
                         f"{settings.offload}; probe with --tp 1 --pp 1 --ep 1 --zero 0 and no --offload")


def worst_case_seq_len(lengths: list[int], cap: int | None = None) -> int:
    """The longest sequence the data will present (clipped to ``cap``, the training sequence length)."""
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths):
        raise BatchpilotError(f"sequence lengths must be a non-empty list of positive integers, got {lengths[:5]}")
    longest = max(lengths)
    return min(longest, cap) if cap else longest


def find_knee(trials: list[ProbeTrial] | tuple[ProbeTrial, ...], tolerance: float = KNEE_TOLERANCE) -> int:
    """Smallest micro-batch whose tokens/s is within ``tolerance`` of the best measured (0 if none)."""
    measured = [t for t in trials if t.fits and t.tokens_per_s]
    if not measured:
        return 0
    best = max(t.tokens_per_s or 0.0 for t in measured)
    return min(t.micro_batch for t in measured if (t.tokens_per_s or 0.0) >= (1 - tolerance) * best)


def knee_ladder(max_micro_batch: int, measured: set[int]) -> list[int]:
    """``max/2, max/4, …, 1`` (integer halving), minus sizes already measured, largest first."""
    sizes, b = [], max_micro_batch // 2
    while b >= 1:
        if b not in measured and b not in sizes:
            sizes.append(b)
        b //= 2
    return sizes


# ---------------------------------------------------------------------------- the probe
def default_predictor(request: ProbeRequest) -> Prediction:
    """The analytic memory model's largest micro-batch under the budget.

    On CPU the budget sits above a baseline that already holds the weights (the trial measures its
    baseline after building the model), so the weights are added back to the budget, the measured
    :data:`CPU_TRIAL_OVERHEAD_BYTES` taken off, and the CPU overhead model (no CUDA context, no
    caching-allocator slack) is used.
    """
    from batchpilot.estimate.memory import max_micro_batch

    overhead = _overhead(request)
    budget = request.budget_bytes + baseline_model_bytes(request)
    if request.device == "cpu":
        budget = max(1, budget - CPU_TRIAL_OVERHEAD_BYTES)
    size = max_micro_batch(request.model, request.settings, seq_len=request.seq_len, dp=1,
                           budget_bytes=budget, overhead=overhead)
    b = max(size, 1)
    slope = analytic_trial_bytes(request, b + 1) - analytic_trial_bytes(request, b)
    return Prediction(max_micro_batch=size, bytes_per_sequence=float(slope) if slope > 0 else None)


def _overhead(request: ProbeRequest) -> Any:
    """The analytic overhead terms a trial's peak contains: CPU none; CUDA all but the context, which the
    caching allocator's budget (and ``max_memory_reserved``) does not include."""
    from batchpilot.estimate.overhead import OverheadModel

    return OverheadModel.cpu() if request.device == "cpu" else OverheadModel(cuda_context_bytes=0)


def baseline_model_bytes(request: ProbeRequest) -> int:
    """Bytes of the analytic estimate that a CPU trial's baseline already holds (the weights); 0 on CUDA."""
    if request.device != "cpu":
        return 0
    from batchpilot.estimate.memory import analytic_memory
    from batchpilot.estimate.overhead import OverheadModel

    return analytic_memory(request.model, request.settings, micro_batch=1, seq_len=request.seq_len,
                           overhead=OverheadModel.cpu()).weights_bytes


def analytic_trial_bytes(request: ProbeRequest, micro_batch: int) -> int:
    """The analytic estimate of what a trial's ``peak_bytes`` measures (same baseline convention)."""
    from batchpilot.estimate.memory import analytic_memory

    overhead = _overhead(request)
    total = analytic_memory(request.model, request.settings, micro_batch=micro_batch, seq_len=request.seq_len,
                            overhead=overhead).total_bytes
    return total - baseline_model_bytes(request)


ProgressHook = Callable[[str, int, "ProbeTrial | None"], None]
"""``hook(event, micro_batch, trial)``: ``event`` is ``"start"`` (trial is None) or ``"end"``."""


def run_probe(request: ProbeRequest, *, runner: TrialRunner | None = None,
              predictor: Predictor | None = None, progress: ProgressHook | None = None) -> ProbeResult:
    """Predict, search, measure the knee; every number comes from a real trial (or the injected runner)."""
    start = time.perf_counter()
    trace("probe-start")
    predicted = (predictor or default_predictor)(request)
    if not isinstance(predicted, Prediction):
        predicted = Prediction(max_micro_batch=int(predicted))
    prediction = predicted.max_micro_batch
    trace("predicted", prediction)
    run = runner or make_runner(request)
    trials: list[ProbeTrial] = []

    def trial(micro_batch: int, phase: Phase) -> ProbeTrial:
        if progress:
            progress("start", micro_batch, None)
        result = replace(run(micro_batch), phase=phase)
        trials.append(result)
        if progress:
            progress("end", micro_batch, result)
        return result

    def fits(micro_batch: int) -> Outcome:
        t = trial(micro_batch, "search")
        return Outcome(fits=t.fits, peak_bytes=t.peak_bytes)

    with _closing(run):
        search = search_max_micro_batch(max(1, prediction), fits, budget_bytes=request.budget_bytes,
                                        slope_bytes=predicted.bytes_per_sequence, cap=request.cap)
        search_seconds = time.perf_counter() - start
        trace("search-end", search.max_micro_batch)
        if search.max_micro_batch == 0:
            raise InfeasibleError(_nothing_fits_message(request, trials))
        if request.knee:
            for b in knee_ladder(search.max_micro_batch, {t.micro_batch for t in trials if t.fits}):
                trial(b, "knee")
    return ProbeResult(
        max_micro_batch=search.max_micro_batch, knee_micro_batch=find_knee(trials),
        predicted_max_micro_batch=prediction, search_trials=search.num_trials, trials=tuple(trials),
        device=request.device, budget_bytes=request.budget_bytes, model=request.model.name,
        seq_len=request.seq_len, wall_seconds=time.perf_counter() - start, search_seconds=search_seconds,
        settings=request.settings.to_dict(),
    )


def _nothing_fits_message(request: ProbeRequest, trials: list[ProbeTrial]) -> str:
    last = trials[-1].error if trials else None
    if last and last.startswith(TIMEOUT_ERROR_PREFIX):
        return (f"not even micro-batch 1 of {request.model.name} at --seq-len {request.seq_len} finished "
                f"on {request.device} ({last}); raise --trial-timeout or lower --seq-len")
    return (f"not even micro-batch 1 of {request.model.name} at --seq-len {request.seq_len} fits in "
            f"{request.budget_bytes} bytes on {request.device} ({last}); raise --memory-budget, lower "
            "--seq-len or use --recompute full")


@contextlib.contextmanager
def _closing(runner: Any) -> Any:
    try:
        yield
    finally:
        close = getattr(runner, "close", None)
        if close:
            close()


# ---------------------------------------------------------------------------- trial runners
def make_runner(request: ProbeRequest) -> TrialRunner:
    """The real runner for the request's device."""
    return CudaTrialRunner(request) if request.device == "cuda" else CpuTrialRunner(request)


def trial_spec(request: ProbeRequest, micro_batch: int) -> dict[str, Any]:
    """The plain-value description of one trial (``_trial.TrialSpec`` fields)."""
    s = request.settings
    return dict(hf_config=dict(request.model.hf_config), seq_len=request.seq_len, micro_batch=micro_batch,
                device=request.device, budget_bytes=request.budget_bytes, precision=s.precision,
                recompute=s.recompute, attention=s.attention, optimizer=s.optimizer,
                warmup_steps=request.warmup_steps, timed_steps=request.timed_steps, seed=request.seed)


def _cpu_child(conn: Connection, spec: dict[str, Any], trace_path: str | None = None) -> None:
    """Trial process body: own process group, the trial, one message back. ``trace_path``: the parent's
    :data:`TRACE_ENV` (a fork-server child inherits the server's environment, not the parent's)."""
    os.setpgid(0, 0)
    if trace_path:
        os.environ[TRACE_ENV] = trace_path
    else:
        os.environ.pop(TRACE_ENV, None)
    trace("child-start", spec["micro_batch"])
    from batchpilot.measure._trial import TrialSpec, run_cpu_trial

    try:
        report = run_cpu_trial(TrialSpec(**spec), on_limit_set=lambda base: conn.send(("limit", base)))
        conn.send(("report", report.to_dict()))
        trace("child-reported", spec["micro_batch"])
    except BaseException as exc:  # report anything to the parent; it decides
        with contextlib.suppress(BaseException):
            conn.send(("error", f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"))
    finally:
        conn.close()


def _fork_server_context(model_type: str | None = None) -> Any:
    """The fork server, preloading torch, transformers and the model's modeling module (``transformers``
    imports those lazily: ≈ 4.5 s per fresh process on a 2-core machine); missing modules are skipped."""
    ctx = multiprocessing.get_context("forkserver")
    preload = ["batchpilot.measure._trial"]
    if model_type and model_type.isidentifier():
        preload.append(f"transformers.models.{model_type}.modeling_{model_type}")
    ctx.set_forkserver_preload(preload)
    return ctx


def _trial_context(model_type: str) -> Any:
    """The multiprocessing context trial processes start from: the fork server (see
    :class:`CpuTrialRunner` for why not this process). A seam: tests substitute a plain ``fork``
    context to run patched trial bodies."""
    return _fork_server_context(model_type)


class CpuTrialRunner:
    """Each trial in its own process under RLIMIT_AS = baseline + budget, forked from a fork server.

    Not forked from this process: once a process has run a parallel torch op, a forked child hangs in
    its first parallel region (OpenMP's thread pool does not survive ``fork``; measured here with
    torch 2.13: a 2-thread ``sum`` in the parent, then any op in the child, never returns). The fork
    server never runs a torch op, so its children start clean — at the price of one interpreter start
    with the imports per probe.
    """

    def __init__(self, request: ProbeRequest) -> None:
        self.request = request
        self._ctx = _trial_context(request.model.model_type)

    def __call__(self, micro_batch: int) -> ProbeTrial:
        start = time.perf_counter()
        trace("spawn", micro_batch)
        recv, send = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(target=_cpu_child, args=(send, trial_spec(self.request, micro_batch),
                                                          os.environ.get(TRACE_ENV)),
                                 name=f"batchpilot-trial-{micro_batch}", daemon=True)
        proc.start()
        trace("spawned", micro_batch)
        send.close()
        try:
            messages = _collect(recv, proc, self.request.trial_timeout_s, micro_batch)
            trace("received", micro_batch)
        except TrialTimeoutError as timeout:
            # A size that does not finish in time is not usable: record it as not fitting (with the
            # reason) and let the search go below it; larger sizes would take longer still.
            return ProbeTrial(micro_batch=micro_batch, fits=False, peak_bytes=None, tokens_per_s=None,
                              seconds=time.perf_counter() - start, error=str(timeout))
        finally:
            _kill_group(proc)
            recv.close()
            trace("reaped", micro_batch)
        return _to_trial(micro_batch, messages, proc.exitcode, time.perf_counter() - start)


class TrialTimeoutError(ProbeError):
    """A trial process ran past its timeout (it has been killed with its process group by the caller)."""


def _collect(recv: Connection, proc: Any, timeout_s: float, micro_batch: int) -> list[tuple[str, Any]]:
    """Messages from the trial until it reports or dies; past ``timeout_s`` a :class:`TrialTimeoutError`."""
    deadline = time.monotonic() + timeout_s
    messages: list[tuple[str, Any]] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TrialTimeoutError(f"{TIMEOUT_ERROR_PREFIX} {timeout_s:g} s at micro-batch {micro_batch} "
                                    "and was killed")
        if recv.poll(min(left, 0.5)):
            try:
                messages.append(recv.recv())
            except EOFError:
                return messages
            if messages[-1][0] in ("report", "error"):
                return messages
        elif not proc.is_alive() and not recv.poll(0):
            return messages


def _kill_group(proc: Any) -> None:
    """Kill the trial's process group (it and anything it started) and reap it."""
    if proc.pid is not None and proc.exitcode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    proc.join(timeout=10)


def _to_trial(micro_batch: int, messages: list[tuple[str, Any]], exitcode: int | None,
              seconds: float) -> ProbeTrial:
    kinds = {kind: payload for kind, payload in messages}
    if "report" in kinds:
        r = kinds["report"]
        return ProbeTrial(micro_batch=micro_batch, fits=r["fits"], peak_bytes=r["peak_bytes"],
                          tokens_per_s=r["tokens_per_s"], seconds=seconds, error=r["error"],
                          peak_source=r["peak_source"] if r["fits"] else None)
    if "error" in kinds:
        raise ProbeError(f"trial at micro-batch {micro_batch} failed: {kinds['error']}")
    if "limit" in kinds:  # died under the limit without a word: an allocation outside torch failed
        return ProbeTrial(micro_batch=micro_batch, fits=False, peak_bytes=None, tokens_per_s=None,
                          seconds=seconds, error=f"trial process died under the memory limit (exit code {exitcode})")
    if exitcode == -signal.SIGKILL:  # the kernel's OOM killer, while the model was built or loaded
        raise ProbeError(f"trial process for micro-batch {micro_batch} was killed (SIGKILL) before its memory limit "
                         "was set, while building the model: the model itself likely does not fit in this "
                         "machine's memory; check `batchpilot memory` for its weights, or use a smaller model")
    raise ProbeError(f"trial process for micro-batch {micro_batch} died before its memory limit was set "
                     f"(exit code {exitcode}); run it again, or check that torch works in this environment")


class CudaTrialRunner:
    """Trials in this process on the current CUDA device (``LOCAL_RANK`` under torchrun).

    Under torchrun (``WORLD_SIZE`` > 1) it joins the NCCL process group, so every trial's outcome is
    agreed by all ranks (``_trial.agree_across_ranks``) and all ranks take the same search path.
    """

    def __init__(self, request: ProbeRequest) -> None:
        self.request = request
        self._owns_group = False
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch
            import torch.distributed as dist

            if not dist.is_initialized():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
                dist.init_process_group("nccl")
                self._owns_group = True

    def close(self) -> None:
        if self._owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._owns_group = False

    def __call__(self, micro_batch: int) -> ProbeTrial:
        from batchpilot.measure._trial import TrialSpec, run_cuda_trial

        start = time.perf_counter()
        r = run_cuda_trial(TrialSpec(**trial_spec(self.request, micro_batch)))
        return ProbeTrial(micro_batch=micro_batch, fits=r.fits, peak_bytes=r.peak_bytes,
                          tokens_per_s=r.tokens_per_s, seconds=time.perf_counter() - start, error=r.error,
                          peak_source=r.peak_source if r.fits else None)


def _gemm_child(conn: Connection, precision: str) -> None:
    os.setpgid(0, 0)
    from batchpilot.measure._trial import matmul_flops_per_s

    try:
        conn.send(("report", matmul_flops_per_s(precision)))
    except BaseException as exc:
        with contextlib.suppress(BaseException):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def measure_cpu_matmul_flops(precision: str, timeout_s: float = 120.0) -> float:
    """The CPU's dense matmul FLOP/s (``_trial.matmul_flops_per_s``), measured in a trial process."""
    ctx = _fork_server_context()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_gemm_child, args=(send, precision), name="batchpilot-gemm", daemon=True)
    proc.start()
    send.close()
    try:
        messages = _collect(recv, proc, timeout_s, 0)
    except TrialTimeoutError:
        raise ProbeError(f"measuring this CPU's matmul rate took over {timeout_s:g} s and was stopped") from None
    finally:
        _kill_group(proc)
        recv.close()
    kinds = dict(messages)
    if "report" not in kinds:
        raise ProbeError(f"measuring this CPU's matmul rate failed: {kinds.get('error', proc.exitcode)}")
    return float(kinds["report"])


# ---------------------------------------------------------------------------- device facts
def resolve_device(device: str) -> Device:
    """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without one is an error."""
    if device not in ("auto", "cpu", "cuda"):
        raise BatchpilotError(f"--device {device!r} is not one of: auto, cpu, cuda")
    if device == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise BatchpilotError("--device cuda: torch sees no CUDA device here; use --device cpu or auto")
    return "cpu"


def device_memory_bytes(device: Device) -> int:
    """Default budget: CPU ``MemAvailable`` (/proc/meminfo); CUDA the device's free memory once this
    process's CUDA context exists (``torch.cuda.mem_get_info``), i.e. what the allocator can get."""
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(torch.cuda.current_device())[0])
    with open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise BatchpilotError("cannot read MemAvailable from /proc/meminfo; pass --memory-budget")


# ---------------------------------------------------------------------------- calibration
def calibration_from_probe(result: ProbeResult, request: ProbeRequest, *, peak_flops_per_s: float,
                           accelerator: str, analytic_bytes: Callable[[int], int] | None = None) -> Calibration:
    """Efficiency per tokens-per-micro-batch from the measured tokens/s, and the memory overhead.

    efficiency = tokens/s × FLOPs executed per token ÷ ``peak_flops_per_s``, the FLOPs being
    :func:`batchpilot.estimate.steptime.training_flops_per_token` (model FLOPs plus one more forward of the
    transformer layers with full recomputation, not of the output head), the count the step-time model
    turns back into seconds. The memory overhead is the largest
    (measured peak − analytic estimate) over the fitted trials, floored at 0; it needs
    ``analytic_bytes(micro_batch)`` and is None (keep the model's default) without it.
    """
    from batchpilot.estimate.calibration import Calibration, EfficiencyPoint
    from batchpilot.estimate.steptime import training_flops_per_token

    flops = training_flops_per_token(request.model, request.seq_len, request.settings.recompute)
    best: dict[int, float] = {}
    for t in result.trials:
        if t.fits and t.tokens_per_s:
            tokens = t.micro_batch * request.seq_len
            best[tokens] = max(best.get(tokens, 0.0), t.tokens_per_s)
    points = tuple(
        EfficiencyPoint(tokens_per_micro_batch=n, efficiency=min(1.0, tps * flops / peak_flops_per_s))
        for n, tps in sorted(best.items())
    )
    overhead = None
    if analytic_bytes is not None:
        gaps = [t.peak_bytes - analytic_bytes(t.micro_batch) for t in result.trials if t.fits and t.peak_bytes]
        overhead = max(0, max(gaps)) if gaps else None
    return Calibration(points=points, memory_overhead_bytes=overhead, accelerator=accelerator,
                       model=request.model.name, seq_len=request.seq_len,
                       source=f"batchpilot probe on {result.device}, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")


def check_calibration_accelerator_for(device: Device, accelerator: str | None) -> None:
    """Before any trial: refuse ``--accelerator`` on a CPU probe (its efficiencies would be CPU throughput
    divided by a GPU's peak, recorded under the GPU's name, which ``plan --calibration`` would then accept
    for that GPU), and load the named accelerator (an unknown name fails now, not after the trials)."""
    if accelerator and device == "cpu":
        raise ProbeError(f"--accelerator {accelerator} with --device cpu: a CPU probe cannot calibrate a GPU; "
                         "drop --accelerator (the calibration then divides by this CPU's measured matmul rate "
                         "and is named 'cpu') or probe on the GPU with --device cuda")
    if accelerator:
        from batchpilot.specs.hardware import load_accelerator

        load_accelerator(accelerator)


def write_calibration(result: ProbeResult, request: ProbeRequest, path: str | Path,
                      accelerator: str | None = None) -> Path:
    """Save the probe's calibration (format of :mod:`batchpilot.estimate.calibration`) and return the path.

    The peak FLOP/s the efficiencies divide by: the ``accelerator``'s dense figure at the run's precision
    (catalog name or file); on CPU without one, this CPU's measured matmul rate
    (:func:`measure_cpu_matmul_flops`), named ``cpu`` in the file. CUDA without ``accelerator`` is an
    error (unknown hardware is never guessed).
    """
    from batchpilot.estimate.calibration import save_calibration

    check_calibration_accelerator_for(request.device, accelerator)
    if accelerator:
        from batchpilot.specs.hardware import load_accelerator

        spec = load_accelerator(accelerator)
        peak, name = spec.peak_flops_per_s(request.settings.precision), spec.name
    elif request.device == "cpu":
        peak, name = measure_cpu_matmul_flops(request.settings.precision), "cpu"
    else:
        raise ProbeError("--calibration-out on cuda needs --accelerator NAME (see `batchpilot hardware list`) "
                         "for the peak FLOP/s the efficiencies are relative to")
    calibration = calibration_from_probe(result, request, peak_flops_per_s=peak, accelerator=name,
                                         analytic_bytes=lambda b: analytic_trial_bytes(request, b))
    return save_calibration(calibration, path)
