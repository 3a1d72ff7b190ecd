"""Values from configs, data and records reach the HTML report escaped, and malformed records never
break it: a field of the wrong type, a trial without its micro-batch, 1e308, a string where a list goes.

The HTML is parsed back: only the report's own tags may appear, no ``on*`` attribute, no ``javascript:``,
and every hostile string comes back as text.
"""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from batchpilot.errors import BatchpilotError
from batchpilot.report.html import build_report

HOSTILE = ("<script>alert(1)</script>", "\"><img src=x onerror=alert(2)>", "'><svg onload=alert(3)>",
           "javascript:alert(4)", "</table><iframe src=//evil>", "&lt;already&gt;", "\x1b[31m", "<!--")
ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "table", "tr", "th", "td",
                "ul", "li", "div", "img", "pre"}


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def assert_inert(html_text: str) -> str:
    """Only the report's own markup; returns the page's text content."""
    parser = _Collector()
    parser.feed(html_text)
    for tag, attrs in parser.tags:
        assert tag in ALLOWED_TAGS, tag
        for name, value in attrs:
            assert not name.startswith("on"), (tag, name)
            assert "javascript:" not in (value or "").lower(), (tag, value)
            if tag == "img" and name == "src":
                assert (value or "").startswith("data:image/png;base64,")
    return "".join(parser.text)


def _write(root: Path, files: dict[str, Any]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".jsonl"):
            path.write_text("".join(json.dumps(row) + "\n" for row in content))
        elif isinstance(content, str):
            path.write_text(content)
        else:
            path.write_text(json.dumps(content))
    return root


def _hostile_run(root: Path, bad: str) -> Path:
    trials = [{"micro_batch": m, "fits": m < 8, "peak_bytes": 2**20 * (10 + m) if m < 8 else None,
               "tokens_per_s": 100.0 * m if m < 8 else None, "seconds": 1.0, "error": None if m < 8 else bad}
              for m in (1, 2, 4, 8)]
    return _write(root, {
        "probe.json": {"device": bad, "max_micro_batch": bad, "knee_micro_batch": 4, "predicted_max_micro_batch": bad,
                       "budget_bytes": 2**24, "trials": trials, "model": bad},
        "noise.json": {"b_simple_sequences": bad, "b_simple_tokens": 1000, "band": [bad, 2]},
        "plan.json": {"model": bad, "rationale": bad,
                      "plans": [{"micro_batch": bad, "grad_accum": 1, "dp": bad, "recompute": bad, "mfu": 0.3,
                                 "memory": {"total": bad}}],
                      "rejected": [{"tp": bad, "reason": bad, bad: bad}]},
        "train/metrics.jsonl": [{"step": 1, "tokens": 10, "loss": 3.0, "note": bad}],
        "train/summary.json": {"steps": bad, "final_loss": bad, "tokens": 10},
        "tune.json": {"stages": [{"name": bad, "status": bad, "seconds": bad}]},
        f"exports/{bad.replace('/', '_')}.json": {"x": bad},
    })


@pytest.mark.parametrize("bad", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_values_everywhere_are_escaped(tmp_path: Path, bad: str) -> None:
    run_dir = tmp_path / bad.replace("/", "_")  # the run directory's name is shown too
    run_dir.mkdir()
    files = build_report(_hostile_run(run_dir, bad))
    page = files.html_path.read_text(encoding="utf-8")
    text = assert_inert(page)
    assert bad in text  # shown, as text
    assert "<script" not in page.lower()  # escaped: &lt;script&gt;


MALFORMED: dict[str, dict[str, Any]] = {
    "trial without micro_batch": {"probe.json": {"trials": [{"fits": True, "peak_bytes": 5}]}},
    "micro_batch as string": {"probe.json": {"trials": [{"fits": True, "micro_batch": "4", "peak_bytes": 5},
                                                        {"fits": True, "micro_batch": 2, "peak_bytes": 5}]}},
    "peak_bytes null": {"probe.json": {"trials": [{"fits": True, "micro_batch": 4, "peak_bytes": None}]}},
    "budget as string": {"probe.json": {"budget_bytes": "80GB", "trials": [{"fits": False, "micro_batch": 4},
                                                                           {"fits": True, "micro_batch": 2,
                                                                            "peak_bytes": 9}]}},
    "trials not a list": {"probe.json": {"trials": 5}},
    "trial rows not objects": {"probe.json": {"trials": [1, "x", None]}},
    "plan memory a list": {"plan.json": {"plans": [{"memory": [1]}]}},
    "plans a number": {"plan.json": {"plans": 3, "rejected": "x"}},
    "noise history a number": {"noise.json": {"history": 7, "b_simple_sequences": 3}},
    "noise values a bool": {"noise.json": {"b_simple_sequences": True, "band": {"sequences": "x"}}},
    "memory curve mixed types": {"memory_curve.json": {"micro_batches": [1, "b", None], "analytic": [1, 2, 3]}},
    "memory curve a string": {"memory_curve.json": {"micro_batches": "abc", "analytic": [1, 2, 3]}},
    "1e308 everywhere": {"probe.json": {"budget_bytes": 1e308, "trials": [
        {"fits": True, "micro_batch": 1e308, "peak_bytes": 1e308, "tokens_per_s": 1e308}]},
        "noise.json": {"b_simple_sequences": 1e308, "history": [{"step": 1e308, "b_simple": 1e308}]},
        "train/metrics.jsonl": [{"step": 1, "loss": 1e308, "tokens": 1e308, "elapsed_s": -1e308}]},
    "NaN literals": {"probe.json": '{"trials": [{"fits": true, "micro_batch": NaN, "peak_bytes": Infinity}]}'},
    "metrics of wrong types": {"train/metrics.jsonl": [{"loss": "x", "tokens": 1}, {"loss": 1.0, "tokens": "y"}, [2]]},
    "summary nested": {"plan.json": {"plans": []}, "train/summary.json": {"steps": [1], "tokens": {"a": 1}}},
}


@pytest.mark.parametrize("files", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_records_still_give_a_report(tmp_path: Path, files: dict[str, Any]) -> None:
    result = build_report(_write(tmp_path, files))
    assert_inert(result.html_path.read_text(encoding="utf-8"))
    assert set(result.plot_paths) | set(result.missing) == {"memory", "throughput", "noise", "loss"}
    assert all(p.stat().st_size > 0 for p in result.plot_paths.values())


NUM = st.one_of(st.integers(-10, 10**6), st.floats(allow_nan=False), st.sampled_from([1e308, -1e308, 2**70]),
                st.none(), st.booleans(), st.sampled_from(HOSTILE))
TEXT = st.one_of(st.text(max_size=8), st.sampled_from(HOSTILE))


def _objects(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=fields)


RECORDS = _objects(**{
    "probe.json": _objects(trials=st.lists(_objects(micro_batch=NUM, fits=st.one_of(st.booleans(), NUM),
                                                    peak_bytes=NUM, tokens_per_s=NUM, error=TEXT), max_size=6),
                           budget_bytes=NUM, knee_micro_batch=NUM, max_micro_batch=NUM, device=TEXT),
    "memory_curve.json": _objects(micro_batches=st.lists(NUM, max_size=5), analytic=st.lists(NUM, max_size=5),
                                  traced=st.one_of(st.lists(NUM, max_size=5), NUM)),
    "noise.json": _objects(b_simple_sequences=NUM, b_simple_tokens=NUM,
                           band=st.one_of(st.lists(NUM, max_size=3), _objects(sequences=st.lists(NUM, max_size=2))),
                           history=st.one_of(st.lists(_objects(step=NUM, b_simple_sequences=NUM), max_size=5), NUM)),
    "plan.json": _objects(rationale=TEXT, plans=st.one_of(st.lists(_objects(
        micro_batch=NUM, grad_accum=NUM, dp=NUM, mfu=NUM, tokens_per_s=NUM, recompute=TEXT,
        memory=st.one_of(_objects(total=NUM), NUM)), max_size=3), NUM), rejected=st.lists(_objects(reason=TEXT, tp=NUM),
                                                                                         max_size=3)),
    "train/metrics.jsonl": st.lists(_objects(step=NUM, tokens=NUM, loss=NUM, elapsed_s=NUM, val_loss=NUM,
                                             b_simple=NUM), max_size=6),
    "train/summary.json": _objects(steps=NUM, final_loss=NUM, tokens_per_s=NUM),
    "tune.json": _objects(stages=st.one_of(st.lists(_objects(name=TEXT, status=TEXT, seconds=NUM), max_size=3), NUM)),
})


@pytest.mark.slow
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(RECORDS)
def test_arbitrary_records_never_break_the_report(tmp_path_factory: pytest.TempPathFactory, files: dict[str, Any]) -> None:
    root = _write(tmp_path_factory.mktemp("run"), files)
    try:
        result = build_report(root)
    except BatchpilotError as exc:  # no record at all
        assert "\n" not in str(exc)
        event("refused")
        return
    event(f"report with {4 - len(result.missing)} plot(s)")
    assert_inert(result.html_path.read_text(encoding="utf-8"))
