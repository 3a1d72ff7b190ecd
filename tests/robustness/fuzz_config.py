"""Coverage-guided fuzzing of the config parsers with atheris (libFuzzer), seeded with the shipped files.

Run it directly (``pip install -e '.[fuzz]'``)::

    .venv/bin/python tests/robustness/fuzz_config.py CORPUS_DIR -max_total_time=60

Each input is parsed as a model ``config.json`` (bytes → JSON object → :func:`from_hf_config`) and as an
accelerator file (:func:`accelerator_from_dict`). A :class:`SpecError` is the expected answer to a bad
file; any other exception, or an accepted file that breaks an invariant, is a crash: libFuzzer stops,
prints the traceback and writes the input to ``crash-<sha1>``. ``test_fuzz_config.py`` runs this
harness with a time bound (marked slow) and copies the seed corpus (every preset and catalog file).
"""

from __future__ import annotations

import json
import sys

import atheris

with atheris.instrument_imports():
    from batchpilot.errors import SpecError
    from batchpilot.io import parse_json_object
    from batchpilot.specs.hardware import accelerator_from_dict
    from batchpilot.specs.model import from_hf_config


def check_model(config: dict[str, object]) -> None:
    try:
        spec = from_hf_config(config, name="fuzz")
    except SpecError as exc:
        assert "\n" not in str(exc), str(exc)
        return
    assert 0 < spec.params_active <= spec.params_total, spec
    assert spec.num_heads % spec.num_kv_heads == 0, spec
    assert 0 < spec.flops_per_token(1) < spec.flops_per_token(4096), spec
    json.dumps(spec.to_dict(seq_len=4096), allow_nan=False)


def check_accelerator(data: dict[str, object]) -> None:
    try:
        spec = accelerator_from_dict(data, name="fuzz")
    except SpecError as exc:
        assert "\n" not in str(exc), str(exc)
        return
    assert 2**20 <= spec.memory_bytes <= 2**44, spec
    json.dumps(spec.to_dict(), allow_nan=False)


def test_one_input(raw: bytes) -> None:
    try:
        data = parse_json_object(raw, "fuzz input")
    except SpecError as exc:
        assert "\n" not in str(exc), str(exc)
        return
    check_model(data)
    check_accelerator(data)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
