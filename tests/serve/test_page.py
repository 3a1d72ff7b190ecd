"""The page in a real headless browser (Debian's Chromium over its DevTools protocol): pick a preset, change the
GPU count, and the numbers shown are those of ``batchpilot plan --json`` for the same flags, formatted as the
terminal prints them; an export downloads and parses; bad values show the CLI's one line; nothing overflows
the 1280 px page. ``BATCHPILOT_DOCS=1`` writes the README's screenshot (docs/serve.png) from this test."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import Server, write_run

from batchpilot.cli import app
from batchpilot.report.html import build_report
from batchpilot.specs.model import preset_path

pytest.importorskip("websockets", reason="the optional extra 'serve' is not installed")
from serve_browser import CHROMIUM, Browser

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")

DOCS = Path(__file__).resolve().parents[2] / "docs"
WIDTH = 1280
ROW = re.compile(r"^\s*(\d+×\d+×\d+)\s+(.*\S)\s*$")
PICK = {"model": "llama-3-8b", "gpu": "h100-sxm", "seq-len": "8192", "top": "3"}
TARGET = {"global-batch-tokens": "4Mi"}

SET = """(id, value) => { const node = document.getElementById(id); node.value = value;
  node.dispatchEvent(new Event('change', {bubbles: true})); }"""
ROWS = """[...document.querySelectorAll('#plan-table tbody tr')].map(tr => [...tr.cells].map(td =>
  ({key: td.dataset.key, value: td.dataset.value, text: td.textContent})))"""
OVERFLOW = """[...document.querySelectorAll('table, pre, .bp-chart, .error, .rationale')].filter(n => n.offsetParent)
  .filter(n => n.getBoundingClientRect().right > document.documentElement.clientWidth + 0.5
               || n.scrollWidth > n.clientWidth + 1).map(n => n.tagName + '#' + n.id + '.' + n.className)"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    chrome = Browser(tmp_path_factory.mktemp("chromium"), width=WIDTH, height=900)
    yield chrome
    chrome.close()


def _set(browser: Browser, field: str, value: str) -> None:
    browser.evaluate(f"({SET})({json.dumps(field)}, {json.dumps(value)})")


def _type(browser: Browser, field: str, text: str) -> None:
    """Keyboard only: focus the field, select its text, type, press Enter (the form's implicit submit)."""
    browser.evaluate(f"document.getElementById({json.dumps(field)}).focus(); "
                     f"document.getElementById({json.dumps(field)}).select()")
    browser.send("Input.insertText", {"text": text})
    for kind in ("keyDown", "keyUp"):
        browser.send("Input.dispatchKeyEvent", {"type": kind, "key": "Enter", "code": "Enter",
                                                "windowsVirtualKeyCode": 13, "text": "\r" if kind == "keyDown" else ""})


def _cli(cli_runner, fields: dict[str, str]) -> tuple[dict[str, Any], list[list[str]]]:
    """``plan --json`` and the terminal table's rows (cells split on spaces) for the same flags."""
    args = ["plan", *[p for k, v in fields.items() for p in (f"--{k}", v)]]
    record = cli_runner.invoke(app, [*args, "--json"])
    shown = cli_runner.invoke(app, args, env={"COLUMNS": "200"})
    assert record.exit_code == 0 and shown.exit_code == 0, record.stderr
    rows = [[m[1], *m[2].split()] for m in map(ROW.match, shown.stdout.splitlines()) if m]
    return json.loads(record.stdout), rows


def _wait_plan(browser: Browser, gpus: int) -> list[list[dict[str, str]]]:
    browser.wait(f"document.getElementById('plan-title')?.textContent.includes('on {gpus} ×') "
                 "&& !document.getElementById('result').hidden && "
                 "document.getElementById('status').textContent.startsWith('planned')")
    return browser.evaluate(ROWS)


def _check_numbers(page: list[list[dict[str, str]]], record: dict[str, Any], terminal: list[list[str]]) -> None:
    assert len(page) == len(record["plans"]) == len(terminal) > 0
    for cells, plan, shown in zip(page, record["plans"], terminal, strict=True):
        values = {c["key"]: c.get("value") for c in cells}
        assert float(values["memory"]) == plan["memory"]["total"]
        assert float(values["step_time_s"]) == plan["step_time_s"]
        assert float(values["tokens_per_s"]) == plan["tokens_per_s"]
        assert float(values["mfu"]) == plan["mfu"]
        assert cells[0]["text"] == f"{plan['micro_batch']}×{plan['grad_accum']}×{plan['dp']}"
        assert [c["text"] for c in cells] == shown  # formatted as the terminal prints them


def test_pick_a_preset_change_the_gpus_and_see_plan_json(browser: Browser, server: Server, cli_runner,
                                                         tmp_path: Path) -> None:
    browser.goto(f"{server.base}/")
    browser.wait("document.body.dataset.ready === 'true'")
    for field, value in PICK.items():
        _set(browser, f"f-{field}", value)
    _set(browser, "target-kind", "global-batch-tokens")
    _set(browser, "target-value", TARGET["global-batch-tokens"])
    _set(browser, "f-gpus", "16")
    record, terminal = _cli(cli_runner, {**PICK, **TARGET, "gpus": "16"})
    _check_numbers(_wait_plan(browser, 16), record, terminal)
    assert "gpus=16" in browser.evaluate("location.search")  # the URL carries the settings

    _type(browser, "f-gpus", "32")  # the keyboard alone changes the plan
    record, terminal = _cli(cli_runner, {**PICK, **TARGET, "gpus": "32"})
    _check_numbers(_wait_plan(browser, 32), record, terminal)
    winner = record["plans"][0]
    memory = browser.evaluate("[...document.querySelectorAll('#memory-chart li')].map(li => +li.dataset.value)")
    assert sum(memory) == winner["memory"]["total"]
    step = browser.evaluate("[...document.querySelectorAll('#step-chart li')].map(li => +li.dataset.value)")
    assert sum(step) == pytest.approx(winner["step_time_s"], rel=1e-9)
    assert browser.evaluate("document.querySelector('#rejected summary').textContent").startswith(
        f"{record['rejected_total']} layouts rejected")
    assert browser.evaluate(OVERFLOW) == []
    shot = (DOCS if os.environ.get("BATCHPILOT_DOCS") else tmp_path) / "serve.png"
    browser.screenshot(shot)
    assert shot.stat().st_size > 20_000

    shared = browser.evaluate("location.href")  # a shared link opens the same plan
    browser.goto(shared)
    _check_numbers(_wait_plan(browser, 32), record, terminal)


def test_an_export_downloads_and_parses(browser: Browser, server: Server, tmp_path: Path) -> None:
    query = "&".join(f"{k}={v}" for k, v in {**PICK, **TARGET, "gpus": "32", "engine": "deepspeed"}.items())
    browser.goto(f"{server.base}/?{query}")
    page = _wait_plan(browser, 32)
    browser.send("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(tmp_path)}, browser=True)
    browser.evaluate("document.querySelector('button[data-format=deepspeed]').click()")
    deadline = time.monotonic() + 60
    while not (tmp_path / "deepspeed.json").is_file():
        assert time.monotonic() < deadline, list(tmp_path.iterdir())
        time.sleep(0.1)
    config = json.loads((tmp_path / "deepspeed.json").read_text())
    micro, accum, dp = map(int, page[0][0]["text"].split("×"))
    assert config["train_batch_size"] == micro * accum * dp == 512  # 4Mi tokens / 8192 per sequence
    assert config["train_micro_batch_size_per_gpu"] == micro and config["gradient_accumulation_steps"] == accum


def test_bad_values_show_the_cli_line_and_fixes(browser: Browser, server: Server, cli_runner) -> None:
    browser.goto(f"{server.base}/?model=llama-3-8b&gpu=h100-sxm&gpus=8&seq-len=8192&global-batch=64")
    _wait_plan(browser, 8)
    _set(browser, "f-gpus", "1e99")
    cli = cli_runner.invoke(app, ["plan", "--model", "llama-3-8b", "--gpu", "h100-sxm", "--gpus", "1e99",
                                  "--seq-len", "8192", "--global-batch", "64"])
    assert browser.wait("!document.getElementById('error').hidden && "
                        "document.getElementById('error-text').textContent") == cli.stderr.strip()
    _set(browser, "f-model", "llama-3-70b")
    _set(browser, "f-gpus", "8")
    fixes = browser.wait("!document.getElementById('suggestions-block').hidden && "
                         "[...document.querySelectorAll('#suggestions li')].map(li => li.textContent)")
    assert fixes and browser.evaluate("document.getElementById('error-text').textContent").startswith(
        "error: nothing fits in 72.0 GiB per GPU (h100-sxm")
    assert browser.evaluate(OVERFLOW) == []
    _set(browser, "f-model", "llama-3-8b")  # the server still serves
    _wait_plan(browser, 8)
    assert browser.evaluate("document.getElementById('error').hidden")


def test_an_uploaded_config_plans_in_the_page(browser: Browser, server: Server, tmp_path: Path) -> None:
    big = tmp_path / "huge-config.json"
    big.write_text(" " * (256 * 1024 + 1))
    config = tmp_path / "my-llama.json"
    config.write_bytes(preset_path("llama-3-8b").read_bytes())
    browser.goto(f"{server.base}/?model=gpt2&gpu=h100-sxm&gpus=16&seq-len=8192&global-batch-tokens=4Mi&top=3")
    _wait_plan(browser, 16)
    browser.evaluate("document.querySelector('input[name=model-source][value=upload]').click()")
    node = browser.send("DOM.getDocument")["root"]["nodeId"]
    file_input = browser.send("DOM.querySelector", {"nodeId": node, "selector": "#f-config"})["nodeId"]
    browser.send("DOM.setFileInputFiles", {"nodeId": file_input, "files": [str(big)]})
    assert "the limit is 262,144" in browser.wait("!document.getElementById('error').hidden && "
                                                  "document.getElementById('error-text').textContent")
    browser.send("DOM.setFileInputFiles", {"nodeId": file_input, "files": [str(config)]})
    browser.wait("document.getElementById('plan-title')?.textContent.startsWith('my-llama.json on 16 ×')")
    assert browser.evaluate("document.getElementById('error').hidden")


def test_a_run_folder_opens_in_the_page(browser: Browser, server: Server, tmp_path: Path) -> None:
    browser.goto(f"{server.base}/#runs")
    browser.wait("!!document.querySelector('#run-list button[data-run=demo]')")
    browser.evaluate("document.querySelector('#run-list button[data-run=demo]').click()")
    browser.wait("document.getElementById('run-title')?.textContent === 'batchpilot report — demo' && "
                 "[...document.querySelectorAll('#run-view img')].every(i => i.complete && i.naturalWidth > 0)")
    text = browser.evaluate("document.getElementById('run-view').innerText")
    assert "largest micro-batch that fits (measured)\t24 sequences" in text
    assert browser.evaluate("document.querySelectorAll('#run-view figure.plot img').length") == 3
    assert browser.evaluate(OVERFLOW) == []  # the long export command wraps
    browser.screenshot(tmp_path / "run.png")


def test_the_static_report_fits_1280_px(browser: Browser, tmp_path: Path) -> None:
    """The report as ``batchpilot report`` writes it: no table or code block cut off at the page's edge."""
    files = build_report(write_run(tmp_path / "run"))
    browser.goto(files.html_path.as_uri())
    assert browser.evaluate("document.querySelectorAll('table').length") >= 4  # summary, plans, rejected, stages
    assert browser.evaluate("document.querySelectorAll('pre').length") == 1
    assert browser.evaluate(OVERFLOW) == []
    assert browser.evaluate("document.documentElement.scrollWidth") <= WIDTH
    shot = (DOCS if os.environ.get("BATCHPILOT_DOCS") else tmp_path) / "report.png"
    browser.screenshot(shot)
    assert shot.stat().st_size > 20_000
