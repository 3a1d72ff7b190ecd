"""The CPU allocator's live bytes from the profiler (``measure.cpu_peak``), shared by the traced-memory tests
and ``benchmarks/cpu_step.py``: a second measurement in one process must not inherit the first's state."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from batchpilot.measure.cpu_peak import allocation_records, flatten_events, live_bytes


def test_live_bytes_sum_this_session_and_ignore_frees_of_earlier_ones() -> None:
    # synthetic records (time, pointer, ±bytes): pointer 9 was allocated before the session
    records = [(1, 1, 100), (2, 9, -500), (3, 2, 50), (4, 1, -100), (5, 3, 30)]
    assert live_bytes(records) == [(1, 100), (2, 100), (3, 150), (4, 50), (5, 80)]


def test_a_tensor_freed_in_a_later_profile_does_not_lower_its_count() -> None:
    """1,000,000 bytes allocated under one profile and freed under the next: the allocator's cumulative
    ``total_allocated`` drops by them inside the second profile (the old benchmark's running total read
    250,000 − 1,000,000 there); the live sum counts only the 250,000 bytes the second session allocated."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
        old = torch.empty(1_000_000, dtype=torch.uint8)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        del old
        new = torch.empty(250_000, dtype=torch.uint8)
    events = flatten_events(prof.profiler.kineto_results.experimental_event_tree())  # type: ignore[union-attr]
    records = allocation_records(events)
    assert [nbytes for _, _, nbytes in records] == [-1_000_000, 250_000]
    assert [live for _, live in live_bytes(records)] == [0, 250_000]
    del new
