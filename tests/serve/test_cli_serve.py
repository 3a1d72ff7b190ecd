"""``batchpilot serve``: bad flags are one line and exit 2; the command serves the page and the API on localhost."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from batchpilot.cli import app


@pytest.mark.parametrize(("args", "words"), [
    (["--port", "70000"], "--port 70000 is not a TCP port"),
    (["--port", "http"], "--port 'http' is not a whole number"),
    (["--runs", "/no/such/folder"], "--runs '/no/such/folder' is not a folder"),
])
def test_bad_flags_are_one_line(cli_runner, args: list[str], words: str) -> None:
    result = cli_runner.invoke(app, ["serve", *args])
    assert result.exit_code == 2 and words in result.stderr and len(result.stderr.strip().splitlines()) == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_the_command_serves_on_localhost(tmp_path: Path) -> None:
    pytest.importorskip("uvicorn", reason="the optional extra 'serve' is not installed")
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "batchpilot.cli", "serve", "--port", str(port),
                                "--runs", str(tmp_path)], stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/fields", timeout=5) as response:
                    fields = json.loads(response.read())
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, process.stderr.read() if process.stderr else ""
                time.sleep(0.2)
        assert fields["runs"] is True and "h100-sxm" in fields["accelerators"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/runs", timeout=5) as response:
            assert json.loads(response.read()) == {"root": str(tmp_path.resolve()), "runs": []}
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    assert f"http://127.0.0.1:{port}/" in (process.stderr.read() if process.stderr else "")
