"""The web app: the page, its static files and a JSON API over the planner (Starlette, served by uvicorn).

Routes::

    GET  /                   the page (static/index.html; its URL carries the fields: ?model=…&gpus=…)
    GET  /api/fields         the fields, their defaults and choices (presets, accelerators, published batches)
    GET  /api/plan?FIELDS    = ``batchpilot plan … --json`` for the same flags
    POST /api/plan?FIELDS    the same with an uploaded config.json as the body (the model)
    GET  /api/view?FIELDS    {"plan": the record, "html": the plan as the report shows it (batchpilot.report.html)}
    GET  /api/export?FIELDS&export=deepspeed   the winner's export as a file (POST: with an upload)
    GET  /api/runs           the run folders under the runs root; /api/run?path=NAME one run's report (HTML)

Every bad request is answered ``{"error": "<the CLI's one line>"}`` with status 400 (413 for a body over
:data:`MAX_UPLOAD_BYTES`), and the server goes on serving. Plans run in worker threads, at most
:data:`PLAN_WORKERS` at once, so the page stays responsive while one is searched.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from batchpilot.errors import BatchpilotError
from batchpilot.io import parse_json_object
from batchpilot.plan.engines import ENGINE_NAMES
from batchpilot.plan.exports import FORMATS, SUFFIXES, export_text
from batchpilot.plan.options import PreparedPlan, plan_record, prepare_plan
from batchpilot.plan.planner import plan
from batchpilot.plan.registry import names as registry_names
from batchpilot.report.html import CSS_PATH, plan_html
from batchpilot.serve.params import (
    DEFAULTS,
    FIELDS,
    MAX_VALUE_CHARS,
    export_format,
    plan_options,
)
from batchpilot.serve.runs import RunFolders
from batchpilot.specs.hardware import accelerator_names
from batchpilot.specs.model import ModelSpec, from_hf_config, preset_names
from batchpilot.specs.network import network_names
from batchpilot.specs.settings import (
    ATTENTIONS,
    FP8_RECIPES,
    LOSSES,
    OPTIMIZERS,
    PARAM_DTYPES,
    PRECISIONS,
    RECOMPUTES,
    RESHARDS,
)

STATIC = Path(__file__).with_name("static")
"""The page's files (shipped as package data: the page works offline, nothing from a CDN)."""

MAX_UPLOAD_BYTES = 256 * 1024
"""Largest accepted ``config.json`` upload (real ones are a few KiB; DeepSeek-V3's is 1.7 KiB)."""

PLAN_WORKERS = 2
"""Plans searched at once (one per core of a small machine); more requests wait their turn."""

_UPLOAD_NAME = "config-name"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class _TooLarge(BatchpilotError):
    """A request body over the limit."""


def _error(message: str, status: int = 400, *, fixes: Sequence[str] = ()) -> JSONResponse:
    """``{"error": one line}``, with ``"suggestions"``: the fixes the error carries (the planner's "nothing fits …;
    fits with: A; B" carries the fixes it checked by re-planning, :func:`batchpilot.plan.explain.refusal`), which
    the page lists one per line."""
    body: dict[str, Any] = {"error": _one_line(str(message))}
    if fixes:
        body["suggestions"] = [_one_line(f) for f in fixes]
    return JSONResponse(body, status_code=status)


def _one_line(text: str) -> str:
    return " ".join(text.split())  # one line, whatever the text held


async def _body(request: Request, limit: int = MAX_UPLOAD_BYTES) -> bytes:
    """The request body, refused past ``limit`` bytes without reading the rest."""
    declared = request.headers.get("content-length", "")
    if declared and (not declared.isdigit() or int(declared) > limit):
        raise _TooLarge(f"the upload is {declared[:20]} bytes; the limit is {limit:,} (a config.json is a few KiB)")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge(f"the upload is over {limit:,} bytes (a config.json is a few KiB)")
        chunks.append(chunk)
    return b"".join(chunks)


def _query(request: Request, *, extra: tuple[str, ...] = ()) -> dict[str, str]:
    """The query's fields; a field given twice is refused (which one would count?)."""
    items = request.query_params.multi_items()
    seen: set[str] = set()
    for key, _ in items:
        if key in seen:
            raise BatchpilotError(f"--{key[:MAX_VALUE_CHARS]} is given twice; give it once")
        seen.add(key)
    return {k: v for k, v in items if k not in extra}


async def _uploaded(request: Request) -> ModelSpec | None:
    """The model of an uploaded ``config.json`` (POST body), parsed as data only; None for a GET."""
    if request.method != "POST":
        return None
    raw = await _body(request)
    name = _SAFE_NAME.sub("-", request.query_params.get(_UPLOAD_NAME, "config.json"))[:60] or "config.json"
    config = parse_json_object(raw, f"uploaded config {name!r}")
    return from_hf_config(config, name=name, source="uploaded")


async def _prepared(request: Request, *, extra: tuple[str, ...] = ()) -> PreparedPlan:
    uploaded = await _uploaded(request)
    options = plan_options(_query(request, extra=(_UPLOAD_NAME, *extra)), uploaded=uploaded)
    return prepare_plan(options)


class App:
    """The routes, with the runs root and the limiter of plan workers."""

    def __init__(self, runs: RunFolders) -> None:
        self.runs = runs
        self.limiter = anyio.CapacityLimiter(PLAN_WORKERS)

    async def _run(self, function: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_thread.run_sync(function, *args, limiter=self.limiter)

    async def _plan(self, request: Request, *, extra: tuple[str, ...] = ()) -> tuple[PreparedPlan, Any]:
        prepared = await _prepared(request, extra=extra)
        return prepared, await self._run(plan, prepared.request)

    async def index(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def fields(self, request: Request) -> Response:
        return JSONResponse({
            "fields": [{"name": f.name, "flag": f.flag, "group": f.group} for f in FIELDS.values()],
            "defaults": DEFAULTS, "presets": preset_names(), "accelerators": accelerator_names(),
            "like": registry_names(), "formats": list(FORMATS), "max_upload_bytes": MAX_UPLOAD_BYTES,
            "networks": network_names(),
            "choices": {"precision": PRECISIONS, "optimizer": OPTIMIZERS, "engine": ENGINE_NAMES,
                        "attention": ATTENTIONS, "recompute": RECOMPUTES, "fp8-recipe": FP8_RECIPES,
                        "reshard-after-forward": RESHARDS, "loss": LOSSES, "param-dtype": PARAM_DTYPES},
            "runs": self.runs.enabled,
        })

    async def plan_json(self, request: Request) -> Response:
        prepared, result = await self._plan(request)
        return JSONResponse(plan_record(prepared, result).to_dict())

    async def view(self, request: Request) -> Response:
        prepared, result = await self._plan(request)
        record = plan_record(prepared, result)
        return JSONResponse({"plan": record.to_dict(), "html": plan_html(record)})

    async def css(self, request: Request) -> Response:
        return FileResponse(CSS_PATH, media_type="text/css", headers={"Cache-Control": "no-cache"})

    async def export(self, request: Request) -> Response:
        fmt = export_format(request.query_params.get("export"))
        prepared, result = await self._plan(request, extra=("export",))
        text = export_text(result.plans[0], prepared.request, fmt)
        name = f"{fmt}.{SUFFIXES[fmt]}"
        return PlainTextResponse(text, headers={"Content-Disposition": f'attachment; filename="{name}"'})

    async def run_list(self, request: Request) -> Response:
        return JSONResponse({"root": self.runs.label, "runs": await self._run(self.runs.list)})

    async def run_view(self, request: Request) -> Response:
        path = request.query_params.get("path", "")
        view = await self._run(self.runs.view, path)
        return JSONResponse(view)


def _guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """A handler whose library errors become ``{"error": one line}`` (400, or 413 for an oversized body)."""

    async def guarded(request: Request) -> Response:
        try:
            return await handler(request)
        except _TooLarge as exc:
            return _error(str(exc), 413)
        except BatchpilotError as exc:
            return _error(str(exc), fixes=exc.fixes)
        except RecursionError:
            return _error("the request is nested too deeply")

    return guarded


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else f"internal error ({type(exc).__name__}); see the server log"
    return _error(str(detail), status)


def create_app(*, runs_root: Path | None = None) -> Starlette:
    """The Starlette application; ``runs_root`` is the folder whose run folders the page may open (None: none)."""
    app = App(RunFolders(runs_root))
    routes = [
        Route("/", _guarded(app.index)),
        Route("/api/fields", _guarded(app.fields)),
        Route("/api/plan", _guarded(app.plan_json), methods=["GET", "POST"]),
        Route("/api/view", _guarded(app.view), methods=["GET", "POST"]),
        Route("/api/export", _guarded(app.export), methods=["GET", "POST"]),
        Route("/api/runs", _guarded(app.run_list)),
        Route("/api/run", _guarded(app.run_view)),
        Route("/static/present.css", _guarded(app.css)),  # the report's style sheet: one presentation
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error, Exception: _http_error})

