"""The web app tests' helpers: a run folder written through the records' writers, and HTTP calls to the server."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import record_samples


def write_run(root: Path) -> Path:
    """A tune run folder written through the records' writers (``record_samples``' consistent run)."""
    root.mkdir(parents=True, exist_ok=True)
    record_samples.probe().save(root / "probe.json")
    record_samples.noise().save(root / "noise.json")
    record_samples.plan().save(root / "plan.json")
    record_samples.tune_run().save(root / "tune.json")
    (root / "train").mkdir(exist_ok=True)
    record_samples.summary(out=str(root / "train")).save(root / "train" / "summary.json")
    (root / "exports").mkdir(exist_ok=True)
    long_line = " ".join(f"--flag-{i} {i}" for i in range(60))  # a long command line must wrap, not be cut off
    (root / "exports" / "local-torchrun.sh").write_text(f"torchrun --nproc-per-node 1 -m batchpilot train {long_line}\n")
    return root


class Server:
    """A running app: its base URL and small HTTP helpers returning (status, headers, body)."""

    def __init__(self, base: str, runs: Path) -> None:
        self.base = base
        self.runs = runs

    def request(self, path: str, *, data: bytes | None = None, headers: dict[str, str] | None = None,
                method: str | None = None) -> tuple[int, Any, bytes]:
        req = urllib.request.Request(self.base + path, data=data, headers=headers or {}, method=method)
        try:
            with urllib.request.urlopen(req, timeout=120) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers, error.read()
