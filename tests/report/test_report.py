"""The HTML report: plots drawn from a run's records, values escaped, rendered by headless Chromium.

The run directory here is written by :func:`_write_run`, whose shapes are the JSON contracts of
``probe --json``, ``noise --json``, ``plan --json`` and ``metrics.jsonl``; the end-to-end ``tune`` test
renders a report from real measurements.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from batchpilot.cli import app
from batchpilot.report.html import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HOSTILE = "<script>alert('x')</script>"


def _write_run(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    trials = [
        {"micro_batch": mb, "fits": mb <= 24, "peak_bytes": 2**20 * (100 + 30 * mb) if mb <= 24 else None,
         "tokens_per_s": 1000.0 * mb / (1 + 0.05 * mb) if mb <= 24 else None, "seconds": 1.0}
        for mb in (4, 8, 16, 24, 32)
    ]
    (root / "probe.json").write_text(json.dumps({
        "device": "cpu", "budget_bytes": 2**20 * 900, "max_micro_batch": 24, "knee_micro_batch": 16,
        "predicted_max_micro_batch": 22, "search_trials": 3, "trials": trials}))
    (root / "memory_curve.json").write_text(json.dumps({
        "micro_batches": [4, 8, 16, 24, 32],
        "analytic": [2**20 * (95 + 31 * m) for m in (4, 8, 16, 24, 32)],
        "traced": [2**20 * (100 + 30 * m) for m in (4, 8, 16, 24, 32)]}))
    (root / "noise.json").write_text(json.dumps({
        "b_simple_sequences": 21.5, "b_simple_tokens": 21.5 * 256, "band": [15.0, 30.0], "steps_measured": 20,
        "history": [{"step": s, "b_simple_sequences": 5.0 + s} for s in range(1, 21)]}))
    (root / "plan.json").write_text(json.dumps({
        "rationale": f"micro-batch 16 is the knee {HOSTILE}",
        "plans": [{"micro_batch": 16, "grad_accum": 2, "dp": 1, "tp": 1, "pp": 1, "ep": 1, "zero_stage": 0,
                   "recompute": "none", "global_batch_sequences": 32, "global_batch_tokens": 8192,
                   "tokens_per_s": 12000.0, "mfu": 0.21, "memory": {"total": 2**30}}],
        "rejected": [{"micro_batch": 32, "reason": "does not fit"}]}))
    train = root / "train"
    train.mkdir(exist_ok=True)
    with (train / "metrics.jsonl").open("w") as out:
        for step in range(1, 11):
            row = {"step": step, "tokens": 8192 * step, "loss": 6.0 - 0.3 * step, "elapsed_s": 0.5 * step}
            if step % 5 == 0:
                row["val_loss"] = 6.1 - 0.3 * step
            out.write(json.dumps(row) + "\n")
        out.write('{"step": 11, "tok')  # a torn last line, as a killed writer leaves it
    (root / "exports").mkdir(exist_ok=True)
    (root / "exports" / "deepspeed.json").write_text(json.dumps({"train_batch_size": 32, "note": HOSTILE}))
    return root


def _non_blank(png: Path) -> bool:
    pixels = imread(png)[..., :3]
    return float(np.std(pixels)) > 0.02 and float(np.mean(pixels < 0.9)) > 0.005


def test_report_draws_every_plot_and_escapes_values(tmp_path: Path) -> None:
    files = build_report(_write_run(tmp_path / "run"))
    assert set(files.plot_paths) == {"memory", "throughput", "noise", "loss"}
    assert files.missing == ()
    for path in files.plot_paths.values():
        assert _non_blank(path), path
    page = files.html_path.read_text()
    assert HOSTILE not in page and "&lt;script&gt;" in page
    assert "http://" not in page and "https://" not in page  # opens offline: nothing fetched
    assert page.count("data:image/png;base64,") == 4


def test_report_says_which_stage_is_missing(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "run")
    (run / "noise.json").unlink()
    files = build_report(run)
    assert files.missing == ("noise",)
    assert "did not run" in files.html_path.read_text()


def test_report_cli_errors_are_one_line(cli_runner, tmp_path: Path) -> None:
    result = cli_runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "does not exist" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli_runner.invoke(app, ["report", str(empty)])
    assert result.exit_code == 2 and "no batchpilot records" in result.stderr


def _chromium(*args: str, user_dir: Path) -> subprocess.CompletedProcess[str]:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={user_dir}"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    """Chromium decodes every inlined plot (naturalWidth > 0) and the screenshot is not blank."""
    files = build_report(_write_run(tmp_path / "run"))
    probe = tmp_path / "probe.html"
    check = ("<script>window.addEventListener('load',()=>{for(const i of document.images){"
             "i.setAttribute('data-decoded', String(i.complete && i.naturalWidth > 0));}});</script>")
    probe.write_text(files.html_path.read_text().replace("</body>", check + "</body>"))
    dom = _chromium("--virtual-time-budget=5000", "--dump-dom", probe.as_uri(), user_dir=tmp_path / "u1").stdout
    for name in ("memory", "throughput", "noise", "loss"):
        assert f'id="plot-{name}"' in dom
    assert dom.count('data-decoded="true"') == 4, dom[-2000:]
    shot = files.html_path.with_name("report_screenshot.png")
    _chromium(f"--screenshot={shot}", "--window-size=1200,4000", files.html_path.as_uri(), user_dir=tmp_path / "u2")
    assert shot.is_file() and _non_blank(shot)
