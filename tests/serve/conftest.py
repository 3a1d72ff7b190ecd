"""Fixtures of the web app's tests: a real uvicorn server on a free local port, a runs root with one run, and a
headless Chromium (``serve_browser``; skipped where Debian's chromium or the optional extra ``serve`` is missing)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("starlette", reason="the optional extra 'serve' is not installed")
pytest.importorskip("uvicorn", reason="the optional extra 'serve' is not installed")

import uvicorn
from serve_helpers import Server, write_run

from batchpilot.serve.app import create_app


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    runs = tmp_path_factory.mktemp("runs")
    write_run(runs / "demo")
    (runs / "notes").mkdir()  # no records: not listed
    config = uvicorn.Config(create_app(runs_root=runs), host="127.0.0.1", port=0, log_level="warning")
    app_server = uvicorn.Server(config)
    thread = threading.Thread(target=app_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not app_server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    port = app_server.servers[0].sockets[0].getsockname()[1]
    yield Server(f"http://127.0.0.1:{port}", runs)
    app_server.should_exit = True
    thread.join(timeout=30)
