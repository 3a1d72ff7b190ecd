"""benchmarks/gpu_memory_check.py on a CPU: its plan of measurements, predictions and comparisons (the measurement
itself needs a CUDA GPU)."""

from __future__ import annotations

import pytest
from benchmarks import gpu_memory_check as check

from batchpilot.estimate.memory import analytic_memory
from batchpilot.estimate.overhead import OverheadModel


def test_one_and_eight_billion_shapes() -> None:
    """The 1B case is Llama 3.2 1B's shape (1.24B parameters with tied embeddings); the 8B the llama-3.1-8b preset."""
    assert check.model_spec("llama-1b").params_total == 1_235_814_400
    assert check.model_spec("llama-3.1-8b").params_total == 8_030_261_248
    assert {c.model for c in check.CASES} == {"llama-1b", "llama-3.1-8b"}
    assert {c.recompute for c in check.CASES} >= {"none", "op", "full"}
    assert any(c.recompute_every > 1 for c in check.CASES)


def test_predictions_are_the_analytic_model_on_one_gpu() -> None:
    case = check.CASES[1]
    predicted = check.predict(case, "h100-sxm")
    memory = analytic_memory(check.model_spec(case.model), case.settings(), micro_batch=case.micro_batch,
                             seq_len=case.seq_len, overhead=OverheadModel(optimizer_fused=True, comm_buffer_bytes=0))
    assert predicted["allocated_bytes"] == memory.details["allocated_bytes"]
    assert predicted["reserved_bytes"] == memory.details["reserved_bytes"]
    assert predicted["fits"] is True and predicted["tokens_per_s"] > 0


def test_compare_reports_relative_errors_and_oom_agreement() -> None:
    case = check.CASES[0]
    predicted = {"allocated_bytes": 110, "reserved_bytes": 90, "tokens_per_s": 50.0, "fits": True}
    measured = {"oom": False, "max_memory_allocated": 100, "max_memory_reserved": 100, "tokens_per_s": 100.0}
    out = check.compare(case, measured, predicted)
    assert out["allocated_error"] == pytest.approx(0.10) and out["reserved_error"] == pytest.approx(-0.10)
    assert out["tokens_per_s_error"] == pytest.approx(-0.5)
    assert check.compare(case, {"oom": True}, {**predicted, "fits": False})["fits_agree"] is True


def test_device_names_map_to_the_catalog() -> None:
    assert check.catalog_name("NVIDIA H100 80GB HBM3") == "h100-sxm"
    assert check.catalog_name("NVIDIA H200") == "h200"
    assert check.catalog_name("NVIDIA A100-SXM4-80GB") == "a100-80gb"
    assert check.catalog_name("Some Other GPU") is None


def test_dry_run_lists_every_measurement(capsys: pytest.CaptureFixture[str]) -> None:
    assert check.main(["--dry-run", "--gpu", "h200"]) == 0
    out = capsys.readouterr().out
    assert all(case.name in out for case in check.CASES)
    assert "predicted allocated" in out
    with pytest.raises(SystemExit):
        check.main(["--dry-run", "--cases", "nothing"])
