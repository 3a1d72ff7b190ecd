"""Run folders the page may open: only folders inside the runs root the server was started with.

A request names a folder by its path relative to the root (``demo`` or ``sweeps/a``). Absolute paths,
``..``, backslashes, control characters and symbolic links that lead out of the root are refused in one
line; the listing walks at most :data:`MAX_DEPTH` levels and :data:`MAX_FOLDERS` folders, and skips hidden
folders and links.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from batchpilot.errors import BatchpilotError
from batchpilot.report.html import draw_plots, report_body
from batchpilot.report.records import load_run

_PLOTS = threading.Lock()
"""matplotlib's pyplot keeps global state: one run's plots are drawn at a time."""

MAX_DEPTH = 3
"""Folder levels below the root that the listing looks at."""
MAX_FOLDERS = 500
"""Folders the listing visits at most (a root with more lists the first ones found)."""
MAX_PATH_CHARS = 300

RECORD_FILES = ("tune.json", "plan.json", "probe.json", "noise.json", "memory_curve.json", "metrics.jsonl",
                "summary.json", "train/metrics.jsonl")
"""A folder holding any of these is a run folder (the files :func:`batchpilot.report.records.load_run` reads)."""


class RunFolders:
    """The run folders under ``root`` (None: the server opens none)."""

    def __init__(self, root: Path | None) -> None:
        self.root = root.resolve() if root is not None else None

    @property
    def enabled(self) -> bool:
        """Whether run folders can be opened."""
        return self.root is not None

    @property
    def label(self) -> str:
        """The root as the page names it."""
        return str(self.root) if self.root is not None else ""

    def _root(self) -> Path:
        if self.root is None:
            raise BatchpilotError("this server opens no run folders; start it with `batchpilot serve --runs DIR`")
        return self.root

    def list(self) -> list[str]:
        """Run folders under the root, relative, sorted (breadth-first, bounded; not the folders inside a run)."""
        root = self._root()
        found: list[str] = []
        level = [root]
        visited = 0
        for _ in range(MAX_DEPTH + 1):
            below: list[Path] = []
            for folder in level:
                visited += 1
                if visited > MAX_FOLDERS:
                    return sorted(found)
                if folder != root and any((folder / name).is_file() for name in RECORD_FILES):
                    found.append(folder.relative_to(root).as_posix())
                    continue  # a run's own folders (train/, exports/) are part of it
                below += _subfolders(folder)
            level = below
        return sorted(found)

    def resolve(self, relative: str) -> Path:
        """The run folder ``relative`` names, inside the root; a one-line error for anything else."""
        root = self._root()
        text = relative.strip()
        if not text:
            raise BatchpilotError("no run folder given; pick one of the listed runs")
        shown = text[:80] + ("…" if len(text) > 80 else "")
        if len(text) > MAX_PATH_CHARS or any(ord(c) < 32 for c in text) or "\\" in text:
            raise BatchpilotError(f"run folder {shown!r} is not a folder name of the runs root")
        parts = Path(text).parts
        if Path(text).is_absolute() or ".." in parts or text.startswith("~"):
            raise BatchpilotError(f"run folder {shown!r} must be a path inside the runs root, without '..'")
        path = (root / text).resolve()
        if path != root and root not in path.parents:
            raise BatchpilotError(f"run folder {shown!r} leads out of the runs root")
        if not path.is_dir():
            raise BatchpilotError(f"run folder {shown!r} does not exist under the runs root")
        return path

    def view(self, relative: str) -> dict[str, Any]:
        """One run's report as an HTML fragment (:func:`batchpilot.report.html.report_body`); its plots are
        drawn in a temporary folder, nothing is written into the run folder."""
        path = self.resolve(relative)
        records = load_run(path)
        with _PLOTS, tempfile.TemporaryDirectory(prefix="batchpilot-plots-") as folder:
            drawn = draw_plots(records, Path(folder))
            plots = {name: p.read_bytes() if p is not None else None for name, p in drawn.items()}
        return {"path": path.relative_to(self._root()).as_posix(), "html": report_body(records, plots)}


def _subfolders(folder: Path) -> list[Path]:
    try:
        with os.scandir(folder) as entries:
            return sorted(Path(e.path) for e in entries
                          if not e.name.startswith(".") and e.is_dir(follow_symlinks=False))
    except OSError:
        return []
