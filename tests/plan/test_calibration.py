"""Calibration file: round trip, interpolation, default curve, and one-line errors."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import pytest

from batchpilot.errors import SpecError
from batchpilot.estimate.calibration import (
    DEFAULT_CALIBRATION,
    Calibration,
    EfficiencyPoint,
    MatmulShape,
    check_calibration_accelerator,
    default_efficiency,
    load_calibration,
    save_calibration,
)


def _cal() -> Calibration:
    return Calibration(
        points=(EfficiencyPoint(tokens_per_micro_batch=1024, efficiency=0.2),
                EfficiencyPoint(tokens_per_micro_batch=4096, efficiency=0.4)),
        memory_overhead_bytes=3 * 2**30, accelerator="h100-sxm", model="tiny", seq_len=1024, source="test",
    )


def test_round_trip(tmp_path):
    path = save_calibration(_cal(), tmp_path / "cal.json")
    assert load_calibration(path) == _cal()
    assert json.loads(path.read_text())["format_version"] == 1


def test_interpolation_is_linear_in_log_tokens_and_clamped():
    cal = _cal()
    assert cal.efficiency(2048) == pytest.approx(0.3)  # halfway in log2 between 1024 and 4096
    assert cal.efficiency(10) == 0.2
    assert cal.efficiency(10**6) == 0.4


def test_default_curve_values():
    # e_max · M/(M + 2·e_max·r) · w/(w + ω·r) with e_max 0.68, ω 1 (module docstring). At r = 100 FLOP/byte:
    # M_half = 136 tokens and w_half = 100, so M = 272 and w = 100 give 0.68 · 2/3 · 1/2.
    shape = MatmulShape(tokens=272, width=100, flops_per_byte=100)
    assert default_efficiency(shape) == pytest.approx(0.68 * 2 / 3 / 2)
    assert DEFAULT_CALIBRATION.efficiency_at(shape) == default_efficiency(shape)
    grow = [MatmulShape(tokens=2**k, width=2**k, flops_per_byte=153) for k in range(20)]
    assert all(default_efficiency(a) < default_efficiency(b) < 0.68 for a, b in itertools.pairwise(grow))
    with pytest.raises(ValueError, match="efficiency_at"):
        DEFAULT_CALIBRATION.efficiency(2048)


def test_measured_points_override_the_default_and_read_the_gemm_rows():
    shape = MatmulShape(tokens=2048, width=64, flops_per_byte=295)
    assert _cal().efficiency_at(shape) == pytest.approx(0.3)  # same as efficiency(2048): width not seen


@pytest.mark.parametrize(("edit", "message"), [
    ({"format": "other"}, "format"),
    ({"format_version": 9}, "format_version 9"),
    ({"points": []}, "points"),
    ({"points": [{"tokens_per_micro_batch": 8, "efficiency": 1.5}]}, "efficiency must be in (0, 1]"),
    ({"points": [{"tokens_per_micro_batch": 8, "efficiency": 0.5},
                 {"tokens_per_micro_batch": 8, "efficiency": 0.6}]}, "strictly increasing"),
    ({"memory_overhead_bytes": -1}, "non-negative"),
])
def test_bad_files_are_one_line_errors(tmp_path, edit, message):
    data = _cal().to_dict() | edit
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SpecError, match=None) as info:
        load_calibration(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_file_names_the_fix(tmp_path):
    with pytest.raises(SpecError, match="batchpilot probe"):
        load_calibration(tmp_path / "none.json")
    assert math.isfinite(default_efficiency(MatmulShape(tokens=1, width=1, flops_per_byte=1)))


def test_accelerator_check_accepts_the_same_accelerator_only(tmp_path):
    cal = _cal()  # measured on h100-sxm
    assert check_calibration_accelerator(cal, "h100-sxm") is None
    assert check_calibration_accelerator(cal, "H100-SXM") is None
    with pytest.raises(SpecError) as info:
        check_calibration_accelerator(cal, "a100-80gb", where="calibration file 'cal.json'")
    message = str(info.value)
    assert "\n" not in message and message.startswith("calibration file 'cal.json' was measured on h100-sxm")
    assert "not on --gpu a100-80gb" in message and "--gpu a100-80gb --calibration-out" in message
    gpu = tmp_path / "gpu.json"
    gpu.write_text("{}")
    on_file = dataclasses.replace(cal, accelerator=str(gpu))
    assert check_calibration_accelerator(on_file, str(tmp_path / "." / "gpu.json")) is None
    with pytest.raises(SpecError, match="not on --gpu h100-sxm"):
        check_calibration_accelerator(on_file, "h100-sxm")


def test_a_cpu_calibration_never_calibrates_a_gpu_and_an_unnamed_one_is_a_warning():
    with pytest.raises(SpecError, match=r"CPU \(accelerator 'cpu'.*--gpu h100-sxm"):
        check_calibration_accelerator(dataclasses.replace(_cal(), accelerator="cpu"), "h100-sxm")
    warning = check_calibration_accelerator(dataclasses.replace(_cal(), accelerator=" "), "h100-sxm")
    assert warning is not None and "records no accelerator" in warning and "\n" not in warning
