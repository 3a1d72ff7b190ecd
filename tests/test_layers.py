"""Imports point down the layers (``[tool.importlinter]`` in pyproject.toml, run by ``make lint`` and CI).

The contract is checked twice: on the tree as it is (kept), and on a copy with one wrong-way import
added (broken, naming the import), so a contract that could never fail would fail this test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is in the dev extra")


def _lint(src: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_tree_keeps_every_import_contract(tmp_path: Path) -> None:
    result = _lint(ROOT / "src", tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "3 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(("module", "wrong_import", "expected"), [
    ("specs/settings.py", "from batchpilot.cli import main", "batchpilot.specs is not allowed to import batchpilot.cli"),
    ("estimate/memory.py", "from batchpilot.measure import search", "batchpilot.estimate is not allowed to import batchpilot.measure"),
])
def test_a_wrong_way_import_breaks_the_build(tmp_path: Path, module: str, wrong_import: str, expected: str) -> None:
    copy = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "batchpilot", copy / "batchpilot",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    with (copy / "batchpilot" / module).open("a", encoding="utf-8") as fh:
        fh.write(f"\n{wrong_import}  # noqa\n")
    result = _lint(copy, tmp_path)
    assert result.returncode != 0
    assert expected in result.stdout, result.stdout[-3000:]


def test_a_cycle_between_sibling_modules_breaks_the_build(tmp_path: Path) -> None:
    copy = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "batchpilot", copy / "batchpilot",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    # train.schedule_syntax imports train.schedule; the reverse closes a cycle
    with (copy / "batchpilot" / "train" / "schedule.py").open("a", encoding="utf-8") as fh:
        fh.write("\nfrom batchpilot.train import schedule_syntax  # noqa\n")
    result = _lint(copy, tmp_path)
    assert result.returncode != 0
    assert "No import cycles between sibling modules or packages BROKEN" in result.stdout, result.stdout[-3000:]
