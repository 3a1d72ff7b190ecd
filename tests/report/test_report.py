"""The HTML report: plots drawn from a run's records, values escaped, rendered by headless Chromium.

The run directory here is written by :func:`_write_run` through the records' writers (``metrics.jsonl`` by
hand: a log, not a record); the end-to-end ``tune`` test renders a report from real measurements.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import record_samples
from matplotlib.image import imread

from batchpilot.cli import app
from batchpilot.errors import BatchpilotError
from batchpilot.records.train_summary import TrainNoiseScale
from batchpilot.report.html import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HOSTILE = "<script>alert('x')</script>"


def _write_run(root: Path) -> Path:
    """A tune run folder, every record through its writer (the values: ``record_samples``' consistent run)."""
    root.mkdir(parents=True, exist_ok=True)
    record_samples.probe().save(root / "probe.json")
    record_samples.memory_curve().save(root / "memory_curve.json")
    record_samples.noise().save(root / "noise.json")
    record_samples.plan(rationale=f"micro-batch 24 is the knee {HOSTILE}").save(root / "plan.json")
    record_samples.tune_run().save(root / "tune.json")
    train = root / "train"
    train.mkdir(exist_ok=True)
    record_samples.summary(out=str(train)).save(train / "summary.json")
    with (train / "metrics.jsonl").open("w") as out:
        for step in range(1, 11):
            row = {"step": step, "tokens": 1536 * step, "loss": 6.0 - 0.3 * step, "elapsed_s": 0.5 * step}
            if step % 5 == 0:
                row["val_loss"] = 6.1 - 0.3 * step
            out.write(json.dumps(row) + "\n")
        out.write('{"step": 11, "tok')  # a torn last line, as a killed writer leaves it
    (root / "exports").mkdir(exist_ok=True)
    (root / "exports" / "deepspeed.json").write_text(json.dumps({"train_batch_size": 24, "note": HOSTILE}))
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
    assert files.missing == ()  # the verification run's own B_simple (summary.json's noise_scale) is drawn
    record_samples.summary(noise_scale=TrainNoiseScale(every=0, note="off")).save(run / "train" / "summary.json")
    files = build_report(run)
    assert files.missing == ("noise",)
    assert "did not run" in files.html_path.read_text()


def test_report_shows_each_record(tmp_path: Path) -> None:
    page = build_report(_write_run(tmp_path / "run")).html_path.read_text()
    for text in ("largest micro-batch that fits (measured)</th><td>24 sequences",
                 "critical batch ≈ B_simple (gradient noise scale)</th><td>21.5 sequences (1.38K tokens)",
                 "verification run: optimizer steps</th><td>10</td>", "data-key='stage'>verify</td>",
                 "data-key='kind'>cannot reach the batch</td>", "data-key='reason'>no micro-batch"):
        assert text in page, text


@pytest.mark.parametrize("name", ["probe.json", "noise.json", "plan.json", "memory_curve.json", "tune.json",
                                  "train/summary.json"])
def test_a_record_of_another_version_is_refused_in_one_line(tmp_path: Path, name: str) -> None:
    run = _write_run(tmp_path / "run")
    data = json.loads((run / name).read_text())
    data["schema_version"] = 2
    (run / name).write_text(json.dumps(data))
    with pytest.raises(BatchpilotError) as info:
        build_report(run)
    assert "\n" not in str(info.value) and name in str(info.value) and "schema_version 2" in str(info.value)


def test_an_unversioned_noise_json_is_refused(tmp_path: Path) -> None:
    """The report reads noise.json only as ``batchpilot noise --json`` writes it: a hand-made object (a list as
    band, a ``history`` of per-step values) is not a noise record."""
    run = _write_run(tmp_path / "run")
    (run / "noise.json").write_text(json.dumps({
        "b_simple_sequences": 21.5, "b_simple_tokens": 21.5 * 256, "band": [15.0, 30.0], "steps_measured": 20,
        "history": [{"step": s, "b_simple_sequences": 5.0 + s} for s in range(1, 21)]}))
    with pytest.raises(BatchpilotError, match=r"noise\.json' has no schema_version.*batchpilot noise --json"):
        build_report(run)


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
