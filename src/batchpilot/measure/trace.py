"""The probe's phase trace: where a probe's wall time goes, across the parent and its trial processes.

    BATCHPILOT_PROBE_TRACE=/tmp/trace.jsonl batchpilot probe --model tiny-llama-1m --seq-len 128 --device cpu
"""

from __future__ import annotations

import contextlib
import json
import os
import time

TRACE_ENV = "BATCHPILOT_PROBE_TRACE"
"""Environment variable naming a file: when set, the probe and its trial processes append one JSON line
per phase boundary to it (:func:`trace`) — where a probe's wall time goes, for debugging."""


def trace(event: str, micro_batch: int | None = None) -> None:
    """Append ``{"t": wall-clock s, "pid", "event", "micro_batch"}`` to the :data:`TRACE_ENV` file, if set.

    Wall-clock (``time.time``) so the parent's and the trial processes' lines share one time axis; one
    ``O_APPEND`` write per line so concurrent writers do not interleave. A no-op without the variable;
    never raises (a trial near its memory limit may fail to allocate the line: it is then skipped)."""
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    with contextlib.suppress(Exception):
        line = json.dumps({"t": time.time(), "pid": os.getpid(), "event": event, "micro_batch": micro_batch})
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)
