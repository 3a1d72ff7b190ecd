"""Shared checks of the robustness suite: what "one clear line and exit 2" means, asserted the same way."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BATCHPILOT = REPO / ".venv" / "bin" / "batchpilot"


def assert_one_line_error(stderr: str, *fragments: str) -> str:
    """``stderr`` is exactly one non-empty line ``error: ...`` holding every fragment, and no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    line = lines[0]
    assert line.startswith("error: "), line
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def run_cli(args: Sequence[str], *, cwd: Path | None = None, timeout_s: float = 60.0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The installed console script in a fresh process (what a user runs), output captured."""
    if not BATCHPILOT.exists():
        pytest.skip(f"{BATCHPILOT} is not installed (run `make install`)")
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([str(BATCHPILOT), *args], capture_output=True, text=True, cwd=cwd, timeout=timeout_s,
                          env=full_env, check=False)


def run_in_process(args: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``batchpilot ARGS`` through :func:`~batchpilot.cli._common.run_app` in this process: (code, out, err)."""
    from batchpilot.cli import app
    from batchpilot.cli._common import run_app

    capsys.readouterr()
    code = run_app(app, list(args))
    out, err = capsys.readouterr()
    return code, out, err


PYTHON = sys.executable
