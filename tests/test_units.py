"""Parsing of counts, byte sizes and durations (batchpilot.units)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchpilot.errors import BatchpilotError, UnknownNameError
from batchpilot.units import (
    GIB,
    format_bytes,
    parse_bytes,
    parse_count,
    parse_seconds,
    unknown_name,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1024", 1024), ("4M", 4_000_000), ("4Mi", 4 * 2**20), ("469B", 469 * 10**9), ("1.5K", 1500), ("2e3", 2000)],
)
def test_parse_count(text: str, expected: int) -> None:
    assert parse_count(text) == expected


@pytest.mark.parametrize("text", ["abc", "0", "-5", "1.5", "1e400", "4X", "", "nan", "inf", "1e30"])
def test_parse_count_rejects(text: str) -> None:
    with pytest.raises(BatchpilotError):
        parse_count(text, "--global-batch-tokens")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("6GiB", 6 * GIB), ("80GB", 80 * 10**9), ("512MiB", 512 * 2**20), ("1048576", 2**20), ("2g", 2 * GIB)],
)
def test_parse_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["abc", "0", "-1GiB", "6 parsecs", "1e400GiB"])
def test_parse_bytes_rejects(text: str) -> None:
    with pytest.raises(BatchpilotError, match="--memory-budget"):
        parse_bytes(text, "--memory-budget")


def test_parse_seconds() -> None:
    assert parse_seconds("10m") == 600.0
    assert parse_seconds("1.5h") == 5400.0
    assert parse_seconds("90") == 90.0
    with pytest.raises(BatchpilotError):
        parse_seconds("0s")


def test_format_bytes_labels_binary_units() -> None:
    assert format_bytes(1.5 * GIB) == "1.50 GiB"
    assert format_bytes(100) == "100 B"


def test_unknown_name_suggests_close_match() -> None:
    err = unknown_name("accelerator", "h100", ["h100-sxm", "a100-80gb"])
    assert isinstance(err, UnknownNameError)
    assert "h100-sxm" in str(err) and "\n" not in str(err)


@given(st.text(max_size=30))
def test_parsers_never_crash(text: str) -> None:
    """Any string either parses to a positive number or raises the library's one-line error."""
    for parse in (parse_count, parse_bytes, parse_seconds):
        try:
            assert parse(text) > 0
        except BatchpilotError as exc:
            assert "\n" not in str(exc)
