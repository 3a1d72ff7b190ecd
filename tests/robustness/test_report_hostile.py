"""Values from configs, data and records reach the HTML report escaped; a malformed record is refused by its
loader in one line (a field of the wrong type, a trial without its micro-batch, a string where a list goes);
values a plot cannot lay out (1e308, 2**70) leave that plot out, never the report.

The HTML is parsed back: only the report's own tags may appear, no ``on*`` attribute, no ``javascript:``,
and every hostile string comes back as text.
"""

from __future__ import annotations

import json
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import record_samples
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from batchpilot.errors import BatchpilotError
from batchpilot.report.html import build_report

HOSTILE = ("<script>alert(1)</script>", "\"><img src=x onerror=alert(2)>", "'><svg onload=alert(3)>",
           "javascript:alert(4)", "</table><iframe src=//evil>", "&lt;already&gt;", "\x1b[31m", "<!--")
ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "table", "tr", "th", "td",
                "ul", "li", "div", "img", "pre", "thead", "tbody", "caption", "figure", "figcaption", "span", "strong",
                "details", "summary", "svg", "rect", "line"}


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
    """Every string a record holds set to ``bad``, written through the records' writers."""
    record_samples.probe(model=bad, trials=tuple(replace(t, error=bad) for t in record_samples.probe().trials)
                         ).save(root / "probe.json")
    record_samples.noise(model=bad, data=bad).save(root / "noise.json")
    plan = record_samples.plan(model=bad, rationale=bad, calibration=bad, target_source=bad)
    plan = replace(plan, rejected=tuple(replace(r, reason=bad) for r in plan.rejected))
    plan.save(root / "plan.json")
    tune = record_samples.tune_run()
    replace(tune, stages=tuple(replace(s, name=bad, message=bad) for s in tune.stages)).save(root / "tune.json")
    (root / "train").mkdir()
    record_samples.summary(device=bad, tokenizer=bad, batch_schedule=bad).save(root / "train" / "summary.json")
    return _write(root, {
        "train/metrics.jsonl": [{"step": 1, "tokens": 10, "loss": 3.0, "note": bad}],
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


def _versioned(data: dict[str, Any]) -> dict[str, Any]:
    return {"schema_version": 1, **data}


REFUSED: dict[str, dict[str, Any]] = {
    "trial without micro_batch": {"probe.json": _versioned({"trials": [{"fits": True, "peak_bytes": 5}]})},
    "micro_batch as string": {"probe.json": record_samples.probe().to_dict() | {"trials": [
        {"fits": True, "micro_batch": "4", "peak_bytes": 5, "tokens_per_s": None, "seconds": 1.0}]}},
    "budget as string": {"probe.json": record_samples.probe().to_dict() | {"budget_bytes": "80GB"}},
    "trials not a list": {"probe.json": record_samples.probe().to_dict() | {"trials": 5}},
    "trial rows not objects": {"probe.json": record_samples.probe().to_dict() | {"trials": [1, "x", None]}},
    "plan memory a list": {"plan.json": record_samples.plan().to_dict() | {"plans": [{"memory": [1]}]}},
    "plans a number": {"plan.json": record_samples.plan().to_dict() | {"plans": 3, "rejected": "x"}},
    "noise in another format": {"noise.json": {"history": 7, "b_simple_sequences": 3, "band": [1, 2]}},
    "noise values a bool": {"noise.json": record_samples.noise().to_dict() | {"b_simple_sequences": True}},
    "memory curve mixed types": {"memory_curve.json": record_samples.memory_curve().to_dict()
                                 | {"micro_batches": [1, "b", None]}},
    "memory curve a string": {"memory_curve.json": record_samples.memory_curve().to_dict() | {"micro_batches": "abc"}},
    "1e308 as a micro-batch": {"probe.json": record_samples.probe().to_dict() | {"max_micro_batch": 1e308}},
    "NaN literals": {"probe.json": '{"schema_version": 1, "trials": [{"fits": true, "micro_batch": NaN}]}'},
    "summary nested": {"train/summary.json": record_samples.summary().to_dict() | {"steps": [1], "tokens": {"a": 1}}},
    "stages a number": {"tune.json": record_samples.tune_run().to_dict() | {"stages": 7}},
}


@pytest.mark.parametrize("files", REFUSED.values(), ids=REFUSED.keys())
def test_malformed_records_are_refused_in_one_line(tmp_path: Path, files: dict[str, Any]) -> None:
    """A record that is not what its writer writes is refused by its loader: one line naming the file."""
    with pytest.raises(BatchpilotError) as info:
        build_report(_write(tmp_path, files))
    (name,) = files
    assert "\n" not in str(info.value) and name in str(info.value), str(info.value)


def _huge_probe() -> dict[str, Any]:
    trials = tuple(replace(t, peak_bytes=2**70, tokens_per_s=1e308) if t.fits else t
                   for t in record_samples.probe().trials)
    return record_samples.probe(trials=trials, budget_bytes=2**70).to_dict()


RENDERED: dict[str, dict[str, Any]] = {
    "1e308 and 2**70 in well-typed fields": {
        "probe.json": _huge_probe(),
        "noise.json": record_samples.noise(b_simple_sequences=1e308, trajectory=()).to_dict(),
        "train/metrics.jsonl": [{"step": 1, "loss": 1e308, "tokens": 1e308, "elapsed_s": -1e308}]},
    "metrics of wrong types": {"train/metrics.jsonl": [{"loss": "x", "tokens": 1}, {"loss": 1.0, "tokens": "y"}, [2]]},
    "no feasible plan": {"plan.json": record_samples.plan(plans=()).to_dict()},
}


@pytest.mark.parametrize("files", RENDERED.values(), ids=RENDERED.keys())
def test_unplottable_values_still_give_a_report(tmp_path: Path, files: dict[str, Any]) -> None:
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
    """Either a report or one line: the generated records carry schema_version 1, so each loader's type checks
    (not only its version check) meet them."""
    files = {k: _versioned(v) if k.endswith(".json") else v for k, v in files.items()}
    root = _write(tmp_path_factory.mktemp("run"), files)
    try:
        result = build_report(root)
    except BatchpilotError as exc:  # a record its loader refuses, or no record at all
        assert "\n" not in str(exc)
        event("refused")
        return
    event(f"report with {4 - len(result.missing)} plot(s)")
    assert_inert(result.html_path.read_text(encoding="utf-8"))
