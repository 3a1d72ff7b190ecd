"""``batchpilot report RUN_DIR`` — a self-contained HTML report (plots inline) and PNGs.

Example::

    batchpilot tune --out runs/demo      # writes the records, then calls the report
    batchpilot report runs/demo          # re-render: runs/demo/report.html, runs/demo/plots/*.png
"""

from __future__ import annotations

from pathlib import Path

import typer

from batchpilot.cli._common import console, handle_errors, print_json
from batchpilot.cli._options import JsonOpt


@handle_errors
def report(
    run_dir: Path = typer.Argument(..., help="A run directory written by `batchpilot tune` (or the commands)."),
    json_output: JsonOpt = False,
) -> None:
    """Render the HTML report and PNG plots of a run directory."""
    from batchpilot.report.html import build_report

    files = build_report(run_dir)
    if json_output:
        print_json({
            "report": str(files.html_path),
            "plots": {name: str(path) for name, path in files.plot_paths.items()},
            "missing": list(files.missing),
        })
        return
    console.print(f"report: [bold]{files.html_path}[/bold]")
    for name in files.missing:
        console.print(f"[yellow]no {name} plot: that stage did not run[/yellow]")
