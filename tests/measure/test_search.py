"""The size search against injected "fits?" oracles: exact trial sequences and the never-lie invariant.

Expected sequences are derived by hand from the policy in ``batchpilot.measure.search``'s docstring
(worked in the comments), not by running the code.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchpilot.errors import BatchpilotError
from batchpilot.measure.search import Outcome, estimate_max_from_peaks, search_max_micro_batch

MIB = 2**20


def bool_oracle(limit: int):
    calls: list[int] = []

    def fits(b: int) -> bool:
        calls.append(b)
        return b <= limit

    return fits, calls


def linear_oracle(fixed_bytes: int, per_sample_bytes: int, budget_bytes: int):
    """Memory grows linearly: peak(b) = fixed + b·per_sample; a trial fits when peak ≤ budget."""
    calls: list[int] = []

    def fits(b: int) -> Outcome:
        calls.append(b)
        peak = fixed_bytes + b * per_sample_bytes
        return Outcome(fits=peak <= budget_bytes, peak_bytes=peak if peak <= budget_bytes else None)

    return fits, calls


# ---------------------------------------------------------------- boolean oracle, limit L = 20
@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        # exact: 20 fits, gallop +1 → 21 fails.
        (20, [20, 21]),
        # 2× too high: 40 fails, step down → 39 fails, halve → 19 fits; bracket (19, 39): bisect
        # 29 ✗, 24 ✗, 21 ✗, 20 ✓.
        (40, [40, 39, 19, 29, 24, 21, 20]),
        # 2× too low: 10 fits, gallop +1, +2, +4, +8 → 11, 13, 17 fit, 25 fails; bisect 21 ✗, 19 ✓, 20 ✓.
        (10, [10, 11, 13, 17, 25, 21, 19, 20]),
        # one too high: 21 fails, step down → 20 fits; bracket (20, 21) closed.
        (21, [21, 20]),
    ],
    ids=["exact", "2x-high", "2x-low", "plus-one"],
)
def test_boolean_oracle_exact_sequences(prediction: int, expected: list[int]) -> None:
    fits, calls = bool_oracle(20)
    result = search_max_micro_batch(prediction, fits)
    assert result.sizes == expected == calls
    assert result.max_micro_batch == 20
    assert result.num_trials == len(expected)


# ---------------------------------------------------------------- linear memory oracle
# fixed 30 MiB + 50 MiB per sequence under 1024 MiB: L = ⌊(1024 − 30) / 50⌋ = 19.
@pytest.mark.parametrize(
    ("prediction", "expected", "rules"),
    [
        # 19 fits at 980 MiB; origin line: 19·1024/980 = 19.9 → ⌊⌋ 19 ≤ lo → gallop 20 fails.
        (19, [19, 20], ["prediction", "confirm"]),
        # 38 ✗, step down 37 ✗, halve → 18 fits at 930; origin line 18·1024/930 = 19.8 → 19 fits;
        # two-point line (slope 50): 19 + ⌊44/50⌋ = 19 ≤ lo → confirm 20 fails.
        (38, [38, 37, 18, 19, 20], ["prediction", "step-down", "halve", "guided", "confirm"]),
        # one too high: 20 ✗, step down → 19 fits; bracket closed.
        (20, [20, 19], ["prediction", "step-down"]),
        # 9 fits at 480 MiB; origin line: 9·1024/480 = 19.2 → 19 fits at 980; two-point line
        # slope 50 MiB: 19 + ⌊44/50⌋ = 19 ≤ lo → confirm 20 fails.
        (9, [9, 19, 20], ["prediction", "guided", "confirm"]),
    ],
    ids=["exact", "2x-high", "plus-one", "2x-low"],
)
def test_linear_memory_oracle_exact_sequences(prediction: int, expected: list[int], rules: list[str]) -> None:
    fits, calls = linear_oracle(30 * MIB, 50 * MIB, 1024 * MIB)
    result = search_max_micro_batch(prediction, fits, budget_bytes=1024 * MIB)
    assert result.sizes == expected == calls
    assert [s.rule for s in result.steps] == rules
    assert result.max_micro_batch == 19


def test_large_fixed_part_takes_one_more_guided_step() -> None:
    # fixed 300 MiB + 36 MiB/seq under 1024 MiB: L = ⌊724/36⌋ = 20. 10 fits at 660 → origin line
    # 10·1024/660 = 15.5 → 15 fits at 840 → slope 36: 15 + ⌊184/36⌋ = 20 fits → 20 ≤ lo → 21 fails.
    fits, _ = linear_oracle(300 * MIB, 36 * MIB, 1024 * MIB)
    result = search_max_micro_batch(10, fits, budget_bytes=1024 * MIB)
    assert result.sizes == [10, 15, 20, 21]
    assert result.max_micro_batch == 20


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        # 20 fits at 1020 MiB (fixed 20 + 50/seq, budget 1024: L = 20); line through it with slope 50:
        # 20 + ⌊4/50⌋ = 20 ≤ lo → confirm 21 fails.
        (20, [20, 21]),
        # one too high: 21 fails, step down → 20 fits; bracket (20, 21) closed.
        (21, [21, 20]),
        # 2× too low: 10 fits → 20 fits → two-point line says 20 → confirm 21 fails.
        (10, [10, 20, 21]),
        # 2× too high: 40 ✗, 39 ✗, halve → 19 fits at 970; 19 + ⌊54/50⌋ = 20 fits; line says 20 →
        # confirm 21 fails.
        (40, [40, 39, 19, 20, 21]),
    ],
    ids=["exact", "plus-one", "2x-low", "2x-high"],
)
def test_slope_hint_makes_one_point_lines_exact(prediction: int, expected: list[int]) -> None:
    fits, _ = linear_oracle(20 * MIB, 50 * MIB, 1024 * MIB)
    result = search_max_micro_batch(prediction, fits, budget_bytes=1024 * MIB, slope_bytes=50 * MIB)
    assert result.sizes == expected
    assert result.max_micro_batch == 20


def test_nothing_fits_halves_down_to_one() -> None:
    fits, _ = bool_oracle(0)
    result = search_max_micro_batch(8, fits)
    assert result.sizes == [8, 7, 3, 1]  # step down, then halve: 7 // 2, 3 // 2
    assert result.max_micro_batch == 0


def test_cap_stops_the_search() -> None:
    fits, _ = bool_oracle(10**9)
    result = search_max_micro_batch(64, fits, cap=64)
    assert result.sizes == [64]
    assert result.max_micro_batch == 64


def test_prediction_below_one_is_clamped() -> None:
    fits, _ = bool_oracle(3)
    assert search_max_micro_batch(0, fits).sizes[0] == 1


def test_overshooting_line_falls_back_to_bisection() -> None:
    # The oracle reports peaks that make memory look cheap (a quarter of the truth), so every guided
    # step overshoots: after two guided failures in a row the search must bisect, and still find 20.
    calls: list[int] = []

    def fits(b: int) -> Outcome:
        calls.append(b)
        return Outcome(fits=b <= 20, peak_bytes=b * 10 * MIB)

    result = search_max_micro_batch(20, fits, budget_bytes=1000 * MIB)
    assert result.max_micro_batch == 20
    rules = [s.rule for s in result.steps]
    assert rules[:3] == ["prediction", "guided", "guided"]
    assert "bisect" in rules[3:]


def test_bad_arguments_are_one_line_errors() -> None:
    with pytest.raises(BatchpilotError, match="cap"):
        search_max_micro_batch(4, lambda b: True, cap=0)


def test_estimate_from_peaks() -> None:
    assert estimate_max_from_peaks([(4, 400)], 1000) == 10
    assert estimate_max_from_peaks([(4, 400), (8, 600)], 1000) == 16  # slope 50: 8 + 400/50
    assert estimate_max_from_peaks([(4, 400), (8, 400)], 1000) is None  # flat line: no estimate
    assert estimate_max_from_peaks([], 1000) is None
    assert estimate_max_from_peaks([(4, 400)], 1000, slope_bytes=60.0) == 14  # 4 + ⌊600/60⌋


@settings(max_examples=300, deadline=None)
@given(limit=st.integers(0, 300), prediction=st.integers(-3, 700),
       fixed=st.integers(0, 500), per_sample=st.integers(1, 50), guided=st.booleans())
def test_always_finds_the_limit_and_never_repeats(limit: int, prediction: int, fixed: int,
                                                 per_sample: int, guided: bool) -> None:
    # Peaks reported from an arbitrary (possibly wrong) line; fits is the true limit.
    calls: list[int] = []

    def fits(b: int) -> Outcome:
        calls.append(b)
        return Outcome(fits=b <= limit, peak_bytes=fixed + b * per_sample)

    result = search_max_micro_batch(prediction, fits, budget_bytes=(fixed + 100 * per_sample) if guided else None)
    assert result.max_micro_batch == limit
    assert len(calls) == len(set(calls))
    assert result.num_trials <= 2 * 11 + 4  # exponential + bisection bound for sizes ≤ 2^10


@settings(max_examples=300, deadline=None)
@given(answers=st.lists(st.booleans(), min_size=1, max_size=40), prediction=st.integers(1, 100))
def test_never_reports_a_size_that_did_not_fit(answers: list[bool], prediction: int) -> None:
    # A flaky, non-monotone oracle: whatever it says, the reported max is 0 or a size that fitted.
    it = iter(answers + [False] * 100)

    def fits(b: int) -> bool:
        return next(it)

    result = search_max_micro_batch(prediction, fits, cap=128)
    fitted = {s.micro_batch for s in result.steps if s.fits}
    assert result.max_micro_batch == 0 or result.max_micro_batch in fitted
