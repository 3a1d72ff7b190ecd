"""The JSON API: the same answers as ``batchpilot plan --json``, the same one-line errors as the CLI, and a
server that goes on serving after hostile requests (a real uvicorn server on a local port)."""

from __future__ import annotations

import json
import os
import shlex
import urllib.parse
from pathlib import Path

import pytest
import tomllib
from serve_helpers import Server

from batchpilot.cli import app
from batchpilot.specs.model import preset_path

FLAGS = {"model": "llama-3-8b", "gpu": "h100-sxm", "gpus": "16", "seq-len": "8192", "global-batch-tokens": "4Mi",
         "top": "3"}


def _cli_args(fields: dict[str, str]) -> list[str]:
    return [part for key, value in fields.items() for part in (f"--{key}", value)]


def _query(fields: dict[str, str]) -> str:
    return urllib.parse.urlencode(fields)


def _error(server: Server, path: str, **kwargs: object) -> tuple[int, str]:
    status, _, body = server.request(path, **kwargs)  # type: ignore[arg-type]
    return status, json.loads(body)["error"]


PUBLISHED = {"model": "llama-2-7b", "gpu": "a100-80gb", "gpus": "32", "seq-len": "4Ki", "like": "llama-2-7b",
             "engine": "deepspeed", "zero": "3", "recompute": "none", "headroom": "15%", "top": "2"}
"""A published batch (--like), settings and pins."""


@pytest.mark.parametrize("fields", [FLAGS, PUBLISHED], ids=["tokens", "like-settings-pins"])
def test_the_api_answers_what_plan_json_prints(server: Server, cli_runner, fields: dict[str, str]) -> None:
    cli = cli_runner.invoke(app, ["plan", *_cli_args(fields), "--json"])
    assert cli.exit_code == 0, cli.stderr
    status, headers, body = server.request(f"/api/plan?{_query(fields)}")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == json.loads(cli.stdout)


@pytest.mark.parametrize("changes", [
    {"gpus": "abc"}, {"gpus": "0"}, {"gpus": str(2**40)}, {"seq-len": "1e99"}, {"seq-len": "9" * 40},
    {"headroom": "200%"}, {"precision": "fp7"}, {"model": "llama-9"}, {"gpu": "h100"}, {"global-batch": "512"},
    {"gpus": "12"}, {"tp": "-1"}, {"zero": "7"}, {"recompute": "some"}, {"like": "gpt-5"},
    {"global-batch-tokens": "4Ki", "gpus": "8", "gpus-per-node": "3"},
])
def test_bad_values_read_as_in_the_cli(server: Server, cli_runner, changes: dict[str, str]) -> None:
    fields = {**FLAGS, **changes}
    cli = cli_runner.invoke(app, ["plan", *_cli_args(fields), "--json"])
    assert cli.exit_code == 2 and cli.stderr.startswith("error: ")
    status, message = _error(server, f"/api/plan?{_query(fields)}")
    assert status == 400
    assert f"error: {message}" == cli.stderr.strip()


def test_nothing_fits_lists_the_checked_fixes(server: Server) -> None:
    fields = {"model": "llama-3-70b", "gpu": "h100-sxm", "gpus": "8", "seq-len": "8192", "global-batch": "64"}
    status, _, body = server.request(f"/api/plan?{_query(fields)}")
    answer = json.loads(body)
    assert status == 400 and answer["error"].startswith("nothing fits in 72.0 GiB per GPU (h100-sxm")
    assert answer["suggestions"] and all(s in answer["error"] for s in answer["suggestions"])


@pytest.mark.parametrize(("fmt", "engine", "parse"), [
    ("deepspeed", "deepspeed", json.loads),
    pytest.param("hf", "hf", json.loads, marks=pytest.mark.slow),  # imports transformers' TrainingArguments
    pytest.param("lightning", "lightning", json.loads, marks=pytest.mark.slow),
    ("torchtitan", "torchtitan", tomllib.loads), ("megatron", "megatron", shlex.split),
    ("torchrun", "batchpilot", shlex.split),
])
def test_exports_download_as_files_that_parse(server: Server, fmt: str, engine: str, parse) -> None:
    """Each format from a plan for the engine that runs it (``--engine`` names it)."""
    fields = {"model": "tiny-llama-15m", "gpu": "a100-80gb", "gpus": "8", "seq-len": "512", "global-batch": "64",
              "engine": engine, "export": fmt}
    status, headers, body = server.request(f"/api/export?{_query(fields)}")
    assert status == 200, body
    assert headers["Content-Disposition"].startswith(f'attachment; filename="{fmt}.')
    assert parse(body.decode())


def test_an_uploaded_config_plans_as_its_preset(server: Server) -> None:
    raw = preset_path("llama-3-8b").read_bytes()
    fields = {k: v for k, v in FLAGS.items() if k != "model"}
    status, _, body = server.request(f"/api/plan?{_query({**fields, 'config-name': 'my config.json'})}", data=raw,
                                     headers={"Content-Type": "application/json"})
    assert status == 200, body
    uploaded = json.loads(body)
    _, _, preset = server.request(f"/api/plan?{_query(FLAGS)}")
    assert uploaded["model"] == "my-config.json"
    assert uploaded["plans"] == json.loads(preset)["plans"]


@pytest.mark.parametrize(("body", "status", "words"), [
    (b'{"a": ' * 20_000 + b"1" + b"}" * 20_000, 400, "nested too deeply"),
    (b"\xff\xfe not text", 400, "not UTF-8"),
    (b"[1, 2]", 400, "must hold a JSON object"),
    (b'{"model_type": "llama", "hidden_size": 1e999}', 400, "'hidden_size' must be an integer, got inf"),
    (b'{"model_type": "llama", "hidden_size": ' + b"9" * 5000 + b"}", 400, "too long"),
    (b'{"model_type": "os.system"}', 400, "unsupported model_type"),
    (b" " * (256 * 1024 + 1), 413, "the limit is 262,144"),
])
def test_hostile_uploads_get_one_line(server: Server, body: bytes, status: int, words: str) -> None:
    fields = {k: v for k, v in FLAGS.items() if k != "model"}
    got, message = _error(server, f"/api/plan?{_query(fields)}", data=body)
    assert got == status and words in message and "\n" not in message


@pytest.mark.parametrize(("query", "words"), [
    ("gpus=1&gpus=2", "--gpus is given twice"),
    ("colour=red", "unknown field 'colour'"),
    ("model=" + "x" * 5000, "--model is 5,000 characters long"),
    ("model=%00%2Fetc%2Fpasswd", "unknown model preset"),
    ("model=..%2F..%2F..%2Fetc%2Fpasswd", "unknown model preset"),
    ("gpu=%2Fdev%2Fzero&model=gpt2&seq-len=1", "unknown accelerator"),
    ("top=1000000", "--top 1000000 is above the page's limit of 20"),
])
def test_hostile_queries_get_one_line(server: Server, query: str, words: str) -> None:
    status, message = _error(server, f"/api/plan?{query}")
    assert status == 400 and words in message, message


@pytest.mark.parametrize(("path", "words"), [
    ("../etc", "without '..'"), ("/etc", "without '..'"), ("demo/../../x", "without '..'"),
    ("~root", "without '..'"), ("a\\..\\b", "not a folder name"), ("de%00mo", "not a folder name"),
    ("nope", "does not exist"), ("", "no run folder given"), ("x" * 1000, "not a folder name"),
    ("escape", "leads out of the runs root"),
])
def test_run_folders_refuse_path_tricks(server: Server, path: str, words: str) -> None:
    link = server.runs / "escape"
    if not link.exists():
        os.symlink("/", link)
    status, message = _error(server, f"/api/run?path={urllib.parse.quote(path, safe='%')}")
    assert status == 400 and words in message, message


def test_run_folders_list_and_open(server: Server) -> None:
    _, _, body = server.request("/api/runs")
    assert json.loads(body)["runs"] == ["demo"]
    status, _, body = server.request("/api/run?path=demo")
    view = json.loads(body)
    assert status == 200 and view["path"] == "demo"
    page = view["html"]  # the static report's own presentation
    assert "<th scope='row'>largest micro-batch that fits (measured)</th><td>24 sequences</td>" in page  # 100 + 30·b MiB ≤ 900
    assert "<td>21.5 sequences (1.38K tokens)</td>" in page
    assert "data-key='triad'>24×1×1</td>" in page
    assert page.count("data:image/png;base64,") == 3  # memory, throughput, noise; no metrics.jsonl: no loss plot
    assert not (server.runs / "demo" / "plots").exists()  # nothing written into the run folder


def test_the_server_keeps_serving_after_hostile_requests(server: Server) -> None:
    for path in ("/api/plan?gpus=1e999", "/api/run?path=../../", "/api/nothing", "/static/../app.py",
                 "/api/export?export=pdf"):
        status, _, body = server.request(path)
        assert 400 <= status < 500 and "\n" not in body.decode().strip(), (path, body)
    status, _, body = server.request("/api/fields")
    assert status == 200 and "llama-3-8b" in json.loads(body)["presets"]


def test_the_page_and_its_assets_ship_in_the_package(server: Server) -> None:
    status, _, page = server.request("/")
    assert status == 200 and b"<label for=\"f-gpus\">" in page
    for asset in ("page.js", "present.css", "page.css"):
        status, _, body = server.request(f"/static/{asset}")
        body = body.replace(b"http://www.w3.org/2000/svg", b"")  # the SVG namespace names, it fetches nothing
        assert status == 200 and b"http://" not in body and b"https://" not in body, asset  # offline: no CDN
    assert b"http://" not in page and b"https://" not in page
    static = Path(__import__("batchpilot.serve.app", fromlist=["STATIC"]).STATIC)
    assert sorted(p.name for p in static.iterdir()) == ["index.html", "page.css", "page.js"]


def test_package_data_ships_the_page_and_the_style_sheet() -> None:
    """pyproject's package-data patterns cover every asset (an installed wheel serves the page offline)."""
    from fnmatch import fnmatch

    import batchpilot

    root = Path(batchpilot.__file__).parent
    pyproject = tomllib.loads((root.parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["batchpilot"]
    assets = [*(root / "serve" / "static").iterdir(), root / "report" / "present.css"]
    for asset in assets:
        assert any(fnmatch(asset.relative_to(root).as_posix(), p) for p in patterns), asset


def test_the_page_takes_every_plan_flag() -> None:
    """Every field of PlanOptions (what `plan` takes) is a field of the page, but the two file flags: the server
    opens no path a request names."""
    from dataclasses import fields

    from batchpilot.plan.options import PlanOptions
    from batchpilot.plan.request import Pins
    from batchpilot.serve.params import FIELDS

    flags = {f.name.replace("_", "-") for f in fields(PlanOptions)} - {"pins", "noise", "calibration"}
    flags = {"inter-node-bandwidth" if f == "inter-node-bandwidth-bytes-per-s" else f for f in flags}
    pins = {"zero" if f.name == "zero_stage" else f.name.replace("_", "-") for f in fields(Pins)}
    assert flags | pins == set(FIELDS)
