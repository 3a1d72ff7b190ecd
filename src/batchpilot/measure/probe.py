"""Probe: real training steps of the real model on the real device — max micro-batch, peak memory,
tokens/s per micro-batch, the throughput knee, and a calibration for the planner.

Examples::

    batchpilot probe --model tiny-llama-1m --seq-len 256 --memory-budget 512MiB --device cpu
    batchpilot probe --model ./config.json --seq-len 4096 --precision bf16 --recompute full --json

Flow (:func:`run_probe`), one module per part:

1. *Trial runner* (:mod:`batchpilot.measure.cpu_runner`, :mod:`batchpilot.measure.cuda_runner`): on CPU
   each trial is its own process forked from a fork server that has torch and transformers imported; it
   sets its own ``RLIMIT_AS`` to baseline + budget (:mod:`batchpilot.measure._trial`), runs in its own
   process group, and is killed with that group on timeout or interrupt, so nothing is left behind. The
   fork server is started first, so its imports run during the prediction. On CUDA trials run in this
   process: OOM is caught and freed, and under torchrun the ranks agree. Every trial runs the trainer's
   step (:mod:`batchpilot.measure.step`).
2. *Prediction* (:mod:`batchpilot.measure.predict`): the analytic memory model's largest micro-batch
   under the budget (injectable).
3. *Size search* (:mod:`batchpilot.measure.search`): the prediction first, then the guided /
   bracketing policy; every trial reports its measured peak, so the typical case needs 2–3 trials.
4. *Knee*: tokens/s is measured at every trial; to see the curve below the maximum the probe adds the
   halving ladder ``max/2, max/4, …, 1`` (sizes not measured yet). The knee is the smallest measured
   size within 3 % of the best tokens/s (:func:`find_knee`) — on CPUs throughput peaks and then falls
   as the micro-batch grows, so the largest size that fits is not the fastest.
5. *Calibration* (:mod:`batchpilot.measure.calibrate`): efficiency vs tokens per micro-batch and the
   memory the analytic model missed, in the format :mod:`batchpilot.estimate.calibration` reads.

Requests and results are plain values (:mod:`batchpilot.measure.probe_types`); the default device and
budget: :mod:`batchpilot.measure.device`.

Calling :func:`run_probe` from a script: as with any ``multiprocessing`` start method other than
``fork``, each trial process imports the script's main module, so guard the call with
``if __name__ == "__main__":``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from batchpilot.errors import InfeasibleError
from batchpilot.measure.predict import Prediction, Predictor, default_predictor
from batchpilot.measure.probe_types import TIMEOUT_ERROR_PREFIX, ProbeRequest, TrialRunner
from batchpilot.measure.search import Outcome, search_max_micro_batch
from batchpilot.measure.trace import trace
from batchpilot.records.probe import Phase, ProbeResult, ProbeTrial

KNEE_TOLERANCE = 0.03
"""A size is "as fast" as the best when its tokens/s is within 3 % of the best measured (a stated rule: two sizes within 3 % are as fast within the noise of one timed step)."""


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


ProgressHook = Callable[[str, int, "ProbeTrial | None"], None]
"""``hook(event, micro_batch, trial)``: ``event`` is ``"start"`` (trial is None) or ``"end"``."""


def run_probe(request: ProbeRequest, *, runner: TrialRunner | None = None,
              predictor: Predictor | None = None, progress: ProgressHook | None = None) -> ProbeResult:
    """Predict, search, measure the knee; every number comes from a real trial (or the injected runner)."""
    start = time.perf_counter()
    trace("probe-start")
    run = runner or make_runner(request)  # first: the CPU fork server imports while the model predicts
    predicted = (predictor or default_predictor)(request)
    if not isinstance(predicted, Prediction):
        predicted = Prediction(max_micro_batch=int(predicted))
    prediction = predicted.max_micro_batch
    trace("predicted", prediction)
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
        settings=request.settings,
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
def _closing(runner: Any) -> Iterator[None]:
    try:
        yield
    finally:
        close = getattr(runner, "close", None)
        if close:
            close()


def make_runner(request: ProbeRequest) -> TrialRunner:
    """The real runner for the request's device (the CPU runner starts its fork server now)."""
    if request.device == "cuda":
        from batchpilot.measure.cuda_runner import CudaTrialRunner

        return CudaTrialRunner(request)
    from batchpilot.measure.cpu_runner import CpuTrialRunner

    return CpuTrialRunner(request)

