"""``batchpilot serve`` — the planner in a browser (a local web app; the optional extra ``serve``).

Examples::

    batchpilot serve
    batchpilot serve --host 127.0.0.1 --port 8765 --runs runs/
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from batchpilot.cli._common import handle_errors
from batchpilot.cli._options import option, whole
from batchpilot.errors import BatchpilotError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@handle_errors
def serve(
    host: Annotated[str, option("--host", metavar="HOST", help=(
        "Address to listen on. The default serves this machine only; another address exposes the planner "
        "(and --runs) to the network."))] = "127.0.0.1",
    port: Annotated[int, option("--port", whole("--port"), help="TCP port.")] = 8765,
    runs: Annotated[Path | None, option("--runs", metavar="DIR", show_default="none", help=(
        "A folder whose run folders (tune, probe, noise, plan, train records) the page may open."))] = None,
) -> None:
    """Serve the planner page and its JSON API (the same answers as `plan --json`)."""
    if not 0 < port < 65536:
        raise BatchpilotError(f"--port {port} is not a TCP port; use 1-65535, e.g. 8765")
    if runs is not None and not runs.is_dir():
        raise BatchpilotError(f"--runs {str(runs)!r} is not a folder; give the folder holding your run folders")
    try:
        import uvicorn

        from batchpilot.serve.app import create_app
    except ImportError as exc:
        raise BatchpilotError(f"batchpilot serve needs the optional extra 'serve' ({exc.name} is missing): "
                              "pip install 'batchpilot[serve]'") from None
    if host not in LOCAL_HOSTS:
        typer.echo(f"note: listening on {host}: anyone who reaches this address can use the planner", err=True)
    typer.echo(f"batchpilot serve: http://{'[' + host + ']' if ':' in host else host}:{port}/", err=True)
    uvicorn.run(create_app(runs_root=runs), host=host, port=port, log_level="warning")
