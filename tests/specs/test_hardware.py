"""The accelerator catalog: every shipped file loads, every figure has a source, values are sane,
hostile user files fail with one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from batchpilot.errors import SpecError, UnknownNameError
from batchpilot.names import AmbiguousNameError
from batchpilot.specs.hardware import (
    DTYPES,
    ClusterSpec,
    accelerator_from_dict,
    accelerator_names,
    load_accelerator,
)
from batchpilot.units import GIB

NAMES = accelerator_names()
EXPECTED = {"a100-40gb", "a100-80gb", "h100-sxm", "h100-pcie", "h800", "h200", "b200", "mi300x", "l40s",
            "rtx-4090", "v100-32gb",
            # GPUs people rent, and the parts published training runs used
            "a10g", "l4", "rtx-a6000", "rtx-3090", "h20", "gh200-96gb", "gh200-144gb", "mi250x", "gb200", "gb300",
            "b300", "a800-80gb", "h100-nvl", "h100-sxm-96gb-hbm2e-500w"}


def test_catalog_has_every_expected_device() -> None:
    assert set(NAMES) >= EXPECTED


@pytest.mark.parametrize("name", NAMES)
def test_every_figure_has_a_source_and_flops_are_dense(name: str) -> None:
    spec = load_accelerator(name)
    for key in spec.figure_names():
        source = spec.sources.get(key)
        assert source is not None, f"{name}: {key} has no source"
        assert source.url.startswith("https://"), f"{name}: {key} source is not a URL: {source.url!r}"
        assert source.says.strip(), f"{name}: {key} source does not say what the document states"
        if key.startswith("peak_flops."):
            assert source.dense is True, f"{name}: {key} is not marked as the dense figure"


@pytest.mark.parametrize("name", NAMES)
def test_values_are_sane(name: str) -> None:
    spec = load_accelerator(name)
    assert 16e9 <= spec.memory_bytes <= 320e9  # up to Blackwell Ultra's 288 GiB
    # DRAM capacities are whole GiB in this catalog (the binary reading; see the module docstring).
    assert spec.memory_bytes % GIB == 0
    assert "fp32" in spec.peak_flops and "fp16" in spec.peak_flops
    fp32 = spec.peak_flops_per_s("fp32")
    assert 5e12 <= fp32 <= 200e12
    for dtype in ("tf32", "bf16", "fp16", "fp8"):
        if dtype in spec.peak_flops:
            assert spec.peak_flops_per_s(dtype) >= fp32, f"{name}: {dtype} below fp32"
    if "bf16" in spec.peak_flops:
        # Every device in the catalog runs bf16 and fp16 matrices at the same rate.
        assert spec.peak_flops_per_s("bf16") == spec.peak_flops_per_s("fp16")
    if "fp8" in spec.peak_flops:
        assert spec.peak_flops_per_s("fp8") == pytest.approx(2 * spec.peak_flops_per_s("fp16"), rel=0.02)  # L40S sheet: 733 vs 2 x 362.05
    assert 250e9 <= spec.memory_bandwidth_bytes_per_s <= 20e12  # from the L4's 300 GB/s GDDR6
    assert 16e9 <= spec.intra_node_bandwidth_bytes_per_s <= 2e12
    assert spec.intra_node_bandwidth_bytes_per_s < spec.memory_bandwidth_bytes_per_s


@pytest.mark.parametrize(
    ("name", "dtype", "tflops"),
    [
        # Datasheet values; the tensor ones are the printed "with sparsity" numbers halved.
        ("a100-80gb", "bf16", 312), ("a100-80gb", "tf32", 156), ("a100-40gb", "fp32", 19.5),
        ("h100-sxm", "bf16", 1979 / 2), ("h100-sxm", "fp8", 3958 / 2), ("h100-pcie", "bf16", 1513 / 2),
        ("h200", "bf16", 1979 / 2), ("b200", "bf16", 4500 / 2), ("mi300x", "bf16", 1307.4),
        ("l40s", "fp8", 733), ("rtx-4090", "bf16", 165.2), ("v100-32gb", "fp16", 125),
        ("l4", "bf16", 242 / 2), ("l4", "fp8", 485 / 2), ("h100-nvl", "bf16", 1671 / 2), ("h100-nvl", "fp8", 3341 / 2),
        ("gh200-96gb", "bf16", 1979 / 2), ("gh200-144gb", "fp8", 3958 / 2),
        ("gb200", "bf16", 360_000 / 72 / 2), ("gb200", "fp8", 720_000 / 72 / 2),  # NVL72 rack figures / 72 GPUs
        ("gb300", "bf16", 360_000 / 72 / 2), ("b300", "bf16", 36_000 / 8 / 2), ("b300", "fp8", 72_000 / 8 / 2),
        ("rtx-a6000", "bf16", 309.7 / 2), ("rtx-3090", "bf16", 71), ("rtx-3090", "fp32", 35.6),
        ("a10g", "bf16", 70), ("h20", "bf16", 148), ("h20", "fp8", 296), ("a800-80gb", "bf16", 312),
        ("mi250x", "bf16", 383 / 2), ("mi250x", "fp32", 47.9 / 2),  # per GCD: half the package
        ("h100-sxm-96gb-hbm2e-500w", "bf16", 1979 / 2),  # torchtitan's MFU basis for it (the SXM figure, an upper bound)
    ],
)
def test_published_dense_figures(name: str, dtype: str, tflops: float) -> None:
    assert load_accelerator(name).peak_flops_per_s(dtype) == pytest.approx(tflops * 1e12)


def test_memory_is_read_in_binary_units() -> None:
    # nvidia-smi reports an A100 80GB as 81920 MiB (modal-labs/modal-client#2797).
    assert load_accelerator("a100-80gb").memory_bytes == 81920 * 2**20
    assert load_accelerator("h200").memory_bytes == 141 * GIB


def test_nvlink_is_stored_one_direction() -> None:
    assert load_accelerator("h100-sxm").intra_node_bandwidth_bytes_per_s == 900e9 / 2
    assert load_accelerator("h800").intra_node_bandwidth_bytes_per_s == 400e9 / 2
    assert load_accelerator("a800-80gb").intra_node_bandwidth_bytes_per_s == 400e9 / 2
    # NVL72: "130 TB/s" per 72-GPU rack is 72 x 1.8 TB/s rounded
    assert load_accelerator("gb200").intra_node_bandwidth_bytes_per_s == pytest.approx(130e12 / 72 / 2, rel=0.01)


def test_new_parts_memory_in_binary_units() -> None:
    # Vendor "GB" read as GiB (module docstring); the GB200's 186 GB is 13.4 TB / 72 GPUs, a whole number of GiB.
    assert {name: load_accelerator(name).memory_bytes // GIB for name in
            ("l4", "a10g", "rtx-a6000", "h20", "gh200-96gb", "gh200-144gb", "h100-nvl", "h100-hbm2e", "gb200",
             "b300", "mi250x")} == {"l4": 24, "a10g": 24, "rtx-a6000": 48, "h20": 96, "gh200-96gb": 96,
                                    "gh200-144gb": 144, "h100-nvl": 94, "h100-hbm2e": 96, "gb200": 186,
                                    "b300": 288, "mi250x": 64}


def test_mi250x_is_one_gcd_and_has_no_tf32_or_fp8() -> None:
    gcd = load_accelerator("mi250x")
    assert gcd.memory_bandwidth_bytes_per_s == pytest.approx(3.2768e12 / 2)  # AMD: 3.2 TB/s per two-GCD package
    assert gcd.supported_dtypes == ("fp32", "bf16", "fp16")


def test_dtype_aliases_and_missing_dtypes() -> None:
    h100 = load_accelerator("h100-sxm")
    assert h100.peak_flops_per_s("bfloat16") == h100.peak_flops_per_s("BF16")
    with pytest.raises(SpecError, match=r"a100-80gb has no fp8 .*supports fp32, tf32, bf16, fp16"):
        load_accelerator("a100-80gb").peak_flops_per_s("fp8")
    with pytest.raises(SpecError, match="v100-32gb has no bf16"):
        load_accelerator("v100-32gb").peak_flops_per_s("bfloat16")
    with pytest.raises(SpecError, match="unknown dtype 'int3'"):
        h100.peak_flops_per_s("int3")


def test_names_are_case_insensitive_and_unknown_names_list_known_ones() -> None:
    assert load_accelerator("H100-SXM").name == "h100-sxm"
    with pytest.raises(UnknownNameError) as info:
        load_accelerator("h100-sxn")
    message = str(info.value)
    assert "Did you mean 'h100-sxm'?" in message
    assert all(name in message for name in EXPECTED)
    assert "\n" not in message


def test_gpu_names_match_case_aliases_and_words() -> None:
    assert load_accelerator("H100 SXM").name == "h100-sxm"
    assert load_accelerator("h100_pcie").name == "h100-pcie"
    assert load_accelerator("A6000").name == "rtx-a6000"  # alias
    assert load_accelerator("H100-96GB-HBM2e").name == "h100-sxm-96gb-hbm2e-500w"  # alias of torchtitan's H100
    assert load_accelerator("h100-p").name == "h100-pcie"  # a word typed in part


def test_a_prefix_of_several_gpus_asks_with_the_candidates_and_never_picks() -> None:
    with pytest.raises(AmbiguousNameError) as info:
        load_accelerator("h100")
    message = str(info.value)
    assert message.startswith("accelerator 'h100' is ambiguous: it matches ")
    assert all(name in message for name in ("h100-sxm", "h100-pcie", "h100-nvl", "h100-sxm-96gb-hbm2e-500w"))
    assert "h800" not in message and "\n" not in message
    with pytest.raises(AmbiguousNameError, match="it matches gh200-144gb, gh200-96gb; name one of them"):
        load_accelerator("GH200")


@pytest.mark.parametrize("typed", ["a10", "l40", "mi300", "h10"])
def test_other_products_are_not_prefixes(typed: str) -> None:
    # the A10 is not the A10G, the L40 not the L40S, MI300 not MI300X: digits end only where the name's word ends
    with pytest.raises(UnknownNameError) as info:
        load_accelerator(typed)
    assert not isinstance(info.value, AmbiguousNameError)
    assert str(info.value).startswith(f"unknown accelerator {typed!r}.")


# ---------------------------------------------------------------------- user files
def _minimal() -> dict[str, object]:
    return {
        "display_name": "My GPU",
        "vendor": "acme",
        "memory_bytes": 24 * GIB,
        "peak_flops_per_s": {"fp32": 20e12, "bf16": 100e12},
        "memory_bandwidth_bytes_per_s": 1e12,
        "intra_node_bandwidth_bytes_per_s": 32e9,
    }


def _write(tmp_path: Path, data: object, name: str = "gpu.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_user_file_loads_with_plain_numbers(tmp_path: Path) -> None:
    spec = load_accelerator(_write(tmp_path, _minimal()))
    assert spec.memory_bytes == 24 * GIB
    assert spec.peak_flops_per_s("bf16") == 100e12
    assert spec.supported_dtypes == ("fp32", "bf16")
    assert spec.sources == {}


def test_catalog_file_round_trips_as_user_file(tmp_path: Path) -> None:
    src = Path(__file__).parents[2] / "src/batchpilot/data/accelerators/h100-sxm.json"
    copy = load_accelerator(_write(tmp_path, json.loads(src.read_text())))
    assert copy.to_dict() | {"name": "h100-sxm"} == load_accelerator("h100-sxm").to_dict()


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"memory_bytes": -1}, "memory_bytes = -1 is outside the plausible range"),
        ({"memory_bytes": "80GB"}, "memory_bytes must be a number"),
        ({"memory_bytes": True}, "memory_bytes must be a number"),
        ({"memory_bytes": 1e300}, "outside the plausible range"),
        ({"memory_bytes": 1.5e9 + 0.5}, "whole number of bytes"),
        ({"memory_bandwidth_bytes_per_s": None}, "must be a number"),
        ({"peak_flops_per_s": {"fp32": 312}}, "check its unit"),
        ({"peak_flops_per_s": {"int8": 1e15}}, "unknown dtype 'int8'"),
        ({"peak_flops_per_s": []}, "peak_flops_per_s must be an object"),
        ({"peak_flops_per_s": {"bf16": {"value": 2e15, "source": "https://x", "dense": False}}},
         "must be the dense figure"),
        ({"intra_node_bandwidth_bytes_per_s": {"value": "fast", "source": "https://x"}}, "must be a number"),
        ({"display_name": 7}, "display_name must be a non-empty string"),
        ({"nvlink": 1}, "unknown field"),
    ],
)
def test_hostile_values_are_one_line_spec_errors(tmp_path: Path, patch: dict[str, object], message: str) -> None:
    data = _minimal() | patch
    with pytest.raises(SpecError, match=message) as info:
        load_accelerator(_write(tmp_path, data))
    assert "\n" not in str(info.value)


def test_missing_required_field(tmp_path: Path) -> None:
    data = _minimal()
    del data["memory_bytes"]
    with pytest.raises(SpecError, match="required field 'memory_bytes' is missing"):
        load_accelerator(_write(tmp_path, data))


def test_overflowing_number_literal_is_rejected(tmp_path: Path) -> None:
    # json parses 1e400 as inf without calling parse_constant; the range check must catch it.
    text = json.dumps(_minimal()).replace(str(1e12), "1e400")
    assert "1e400" in text
    with pytest.raises(SpecError, match="must be finite"):
        load_accelerator(_write(tmp_path, text))


@pytest.mark.parametrize("text", ['{"memory_bytes": 1', "[1, 2]", '{"memory_bytes": NaN}', "", "\xff\xfe"])
def test_unreadable_json_is_one_line(tmp_path: Path, text: str) -> None:
    with pytest.raises(SpecError) as info:
        load_accelerator(_write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        load_accelerator(tmp_path / "nope.json")


def test_accelerator_from_dict_rejects_non_mapping_figures() -> None:
    with pytest.raises(SpecError):
        accelerator_from_dict(_minimal() | {"memory_bytes": [1]}, name="x")


# ---------------------------------------------------------------------- cluster
def test_cluster_total_devices_and_record() -> None:
    h100 = load_accelerator("h100-sxm")
    cluster = ClusterSpec(accelerator=h100, devices_per_node=8, num_nodes=256, inter_node_bandwidth_bytes_per_s=50e9)
    assert cluster.total_devices == 2048
    record = cluster.to_dict()
    assert record["total_devices"] == 2048 and record["intra_node_bandwidth_bytes_per_s"] == 450e9


def test_single_node_needs_no_network() -> None:
    assert ClusterSpec(accelerator=load_accelerator("l40s"), devices_per_node=4).total_devices == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"devices_per_node": 0}, "devices_per_node must be a whole number"),
        ({"devices_per_node": 8, "num_nodes": 2}, "needs inter_node_bandwidth_bytes_per_s"),
        ({"devices_per_node": 8, "num_nodes": 2, "inter_node_bandwidth_bytes_per_s": math.nan}, "must be finite"),
        ({"devices_per_node": 8, "num_nodes": 2, "inter_node_bandwidth_bytes_per_s": -5.0}, "outside"),
        ({"devices_per_node": 8.0}, "whole number"),
        ({"devices_per_node": 8, "num_nodes": True}, "whole number"),
    ],
)
def test_cluster_rejects_bad_values(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        ClusterSpec(accelerator=load_accelerator("h100-sxm"), **kwargs)  # type: ignore[arg-type]


def test_dtypes_constant_is_the_record_order() -> None:
    assert list(load_accelerator("h100-sxm").to_dict()["peak_flops_per_s"]) == list(DTYPES)
