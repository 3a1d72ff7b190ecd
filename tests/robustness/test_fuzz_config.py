"""Fuzzing the config parser: a bounded mutation fuzzer over the real preset files (default run) and the
coverage-guided atheris harness ``fuzz_config.py`` (slow; skipped when atheris is not installed).

The property is the same in both: bytes → JSON object → ModelSpec / AcceleratorSpec either succeeds with
consistent numbers or raises a one-line :class:`SpecError`; nothing else escapes.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchpilot.errors import SpecError
from batchpilot.io import parse_json_object
from batchpilot.specs.hardware import accelerator_from_dict
from batchpilot.specs.model import from_hf_config

from .test_properties import check_model_invariants

DATA = Path(__file__).resolve().parents[2] / "src" / "batchpilot" / "data"
SEEDS = sorted([*DATA.glob("models/*.json"), *DATA.glob("accelerators/*.json")])
SEED_BYTES = [p.read_bytes() for p in SEEDS]
TOKENS = [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1", b"0", b"null", b"true", b"[]", b"{}", b'""',
          b"99999999999999999999999", b"0.5", b'"llama"', b'"deepseek_v3"', b"\xff", b"\x00", b"\\u0000", b",", b":"]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A shipped file with up to 6 random edits: a byte flip, a token inserted, a span deleted, cut or doubled."""
    data = bytearray(draw(st.sampled_from(SEED_BYTES)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, max(0, len(data) - 1)))
        kind = draw(st.sampled_from(["flip", "token", "delete", "truncate", "duplicate"]))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "token":
            data[at:at] = draw(st.sampled_from(TOKENS))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 40))]
        elif kind == "truncate":
            del data[at:]
        else:
            data[at:at] = data[at:at + draw(st.integers(1, 60))]
    return bytes(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated())
def test_mutated_preset_files_parse_or_raise_one_line_spec_error(raw: bytes) -> None:
    try:
        data = parse_json_object(raw, "mutated")
    except SpecError as exc:
        assert "\n" not in str(exc)
        return
    for build in (lambda: check_model_invariants(from_hf_config(data, name="mutated")),
                  lambda: accelerator_from_dict(data, name="mutated")):
        try:
            build()
        except SpecError as exc:
            assert "\n" not in str(exc)


def test_seed_corpus_is_the_shipped_files() -> None:
    """The fuzzers start from every preset and catalog file, each of which parses."""
    assert len(SEEDS) >= 20
    for raw in SEED_BYTES:
        assert isinstance(parse_json_object(raw, "seed"), dict)


FUZZ_SECONDS = 45


@pytest.mark.slow
@pytest.mark.timeout(FUZZ_SECONDS * 3)
def test_atheris_fuzzing_run_finds_no_crash(tmp_path: Path) -> None:
    if importlib.util.find_spec("atheris") is None:
        pytest.skip("atheris is not installed (pip install -e '.[fuzz]')")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for seed in SEEDS:
        shutil.copy(seed, corpus / seed.name)
    words = tmp_path / "json.dict"
    words.write_text("".join(f'"{t.decode("latin-1").encode("unicode_escape").decode()}"\n'  # libFuzzer -dict
                             for t in TOKENS if b'"' not in t and b"\\" not in t))
    harness = Path(__file__).with_name("fuzz_config.py")
    proc = subprocess.run(
        [sys.executable, str(harness), str(corpus), f"-max_total_time={FUZZ_SECONDS}", "-timeout=10",
         "-rss_limit_mb=4096", f"-dict={words}", f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, timeout=FUZZ_SECONDS * 2, check=False)
    crashes = sorted(tmp_path.glob("crash-*")) + sorted(tmp_path.glob("timeout-*")) + sorted(tmp_path.glob("oom-*"))
    assert proc.returncode == 0 and not crashes, proc.stderr[-3000:]
    runs = [line for line in proc.stderr.splitlines() if line.startswith("Done ")]
    assert runs, proc.stderr[-2000:]
    assert int(runs[0].split()[1]) > 10_000  # it really ran (about 20k inputs/s on one core)
