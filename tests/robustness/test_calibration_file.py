"""``plan --calibration FILE`` with files that are not calibration files: one line, exit 2, no hang.

Regression: ``load_calibration`` read the whole path with ``Path.read_text``, so ``/dev/zero`` grew until
memory ran out and a FIFO blocked forever. It now reads through ``specs.model.read_json_object`` (regular
files of at most ``MAX_JSON_BYTES``, opened non-blocking). The FIFO and device cases run the installed
script under a timeout, so a regression fails instead of hanging the suite.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from batchpilot.errors import SpecError
from batchpilot.estimate.calibration import load_calibration
from batchpilot.io import MAX_JSON_BYTES

from ._checks import assert_one_line_error, run_cli, run_in_process

PLAN = ["plan", "--model", "tiny-llama-1m", "--gpu", "h100-sxm", "--gpus", "8", "--seq-len", "256",
        "--global-batch", "64"]


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_a_device_is_refused_unread(device: str) -> None:
    done = run_cli([*PLAN, "--calibration", device], timeout_s=60)
    assert done.returncode == 2, done
    assert done.stdout == ""
    assert_one_line_error(done.stderr, f"calibration file '{device}' is not a regular file")


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "calibration.json"
    os.mkfifo(fifo)
    done = run_cli([*PLAN, "--calibration", str(fifo)], timeout_s=60)  # a blocking read never returns
    assert done.returncode == 2, done
    assert_one_line_error(done.stderr, "is not a regular file")


@pytest.mark.parametrize(("content", "fragment"), [
    (b"", "is not valid JSON"),
    (b"[1, 2]", "must hold a JSON object, got list"),
    (b'{"points": [{"tokens_per_micro_batch": 8, "efficiency": NaN}]}', "NaN is not a valid JSON number"),
    (bytes(range(256)), "not UTF-8 text"),
], ids=["empty", "array", "NaN", "binary"])
def test_malformed_content_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes,
                                       fragment: str) -> None:
    path = tmp_path / "cal.json"
    path.write_bytes(content)
    code, stdout, stderr = run_in_process([*PLAN, "--calibration", str(path)], capsys)
    assert code == 2 and stdout == ""
    assert_one_line_error(stderr, "calibration file", fragment)


def test_an_oversized_file_is_refused_by_size(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    with path.open("wb") as handle:  # sparse: no disk used
        handle.truncate(MAX_JSON_BYTES + 1)
    with pytest.raises(SpecError, match=f"the limit is {MAX_JSON_BYTES:,}"):
        load_calibration(path)


def test_a_missing_file_still_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"does not exist; run `batchpilot probe` to make one"):
        load_calibration(tmp_path / "none.json")
    with pytest.raises(SpecError, match="is not a regular file"):
        load_calibration(tmp_path)  # a directory


def test_probe_lengths_file_is_read_bounded(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``probe --lengths /dev/zero`` is refused unread (it used to read forever)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "batchpilot.cli", "probe", "--model", "tiny-llama-1m",
                           "--lengths", "/dev/zero"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "not a regular file" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
