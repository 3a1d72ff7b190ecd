"""CPU trials: each in its own process under ``RLIMIT_AS`` = baseline + budget, started from a fork server.

The trial body (:func:`batchpilot.measure._trial.run_cpu_trial`) sets its own limit after building the
step, so out-of-memory is real; this module starts it, waits for its one report, and kills its whole
process group on timeout or interrupt, so nothing is left behind.

The fork server is one interpreter with torch, transformers, the trial module and the model's modeling
module imported (≈ 3.5 s of imports on a 2-core machine, paid once per probe process instead of per
trial; ``transformers`` imports modeling modules lazily). It is started without waiting for it
(:func:`start_trial_server`): :func:`batchpilot.measure.probe.run_probe` starts it before its
prediction, and a caller that knows the model early (the CLI, ``tune``) can start it sooner still, so
its imports run while the caller does other work; the first trial then waits only for what is left.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
from typing import TYPE_CHECKING, Any

from batchpilot.measure.probe_types import TIMEOUT_ERROR_PREFIX, ProbeError, ProbeRequest, trial_spec
from batchpilot.measure.trace import TRACE_ENV, trace
from batchpilot.records.probe import ProbeTrial

if TYPE_CHECKING:
    from multiprocessing.connection import Connection


def _fork_server_context(model_type: str | None = None) -> Any:
    """The fork server's context, preloading the trial module (torch, transformers) and the model's modeling
    module; missing modules are skipped. The preload list is fixed when the server starts."""
    ctx = multiprocessing.get_context("forkserver")
    preload = ["batchpilot.measure._trial"]
    if model_type and model_type.isidentifier():
        preload.append(f"transformers.models.{model_type}.modeling_{model_type}")
    ctx.set_forkserver_preload(preload)
    return ctx


def start_trial_server(model_type: str | None = None) -> None:
    """Start the fork server now, without waiting for its imports (``multiprocessing``'s
    ``ensure_running`` spawns it and returns; a trial's start blocks until the server has imported).
    Idempotent: a running server is kept (it is reused by every later probe in this process)."""
    import multiprocessing.forkserver

    _fork_server_context(model_type)
    trace("server-start")
    multiprocessing.forkserver.ensure_running()


def _trial_context(model_type: str) -> Any:
    """The multiprocessing context trial processes start from: the fork server (see
    :class:`CpuTrialRunner` for why not this process). A seam: tests substitute a plain ``fork``
    context to run patched trial bodies."""
    return _fork_server_context(model_type)


class CpuTrialRunner:
    """Each trial in its own process under RLIMIT_AS = baseline + budget, forked from the fork server.

    Not forked from this process: once a process has run a parallel torch op, a forked child hangs in
    its first parallel region (OpenMP's thread pool does not survive ``fork``; measured here with
    torch 2.13: a 2-thread ``sum`` in the parent, then any op in the child, never returns). The fork
    server never runs a torch op, so its children start clean — at the price of one interpreter start
    with the imports per probe.
    """

    def __init__(self, request: ProbeRequest) -> None:
        """Starts the fork server (:func:`start_trial_server`) without waiting for it."""
        self.request = request
        self._ctx = _trial_context(request.model.model_type)
        if self._ctx.get_start_method() == "forkserver":
            start_trial_server(request.model.model_type)

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
