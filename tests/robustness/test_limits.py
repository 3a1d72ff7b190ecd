"""Absurd sizes are refused in one line, fast, at the plausibility limits; real sizes at the limit still work.

Regressions: ``plan --seq-len 1 --global-batch-tokens 4611686018427387903`` looped over ~2·10^9 candidate
divisors (minutes); ``memory --seq-len 99999999999999999999`` / ``--gpus 99999999999999999999`` printed
10^18 GiB; ``plan --gpus 99999999999999999992`` blamed ``num_nodes``, a value the user never gave.
"""

from __future__ import annotations

import time

import pytest

from batchpilot.errors import BatchpilotError
from batchpilot.estimate.memory import analytic_memory
from batchpilot.plan import space
from batchpilot.plan.planner import Pins, PlanRequest, plan
from batchpilot.plan.request import MAX_MICRO_BATCH
from batchpilot.specs.batch import MAX_BATCH_SEQUENCES, MAX_SEQ_LEN_TOKENS
from batchpilot.specs.hardware import MAX_DEVICES, ClusterSpec, load_accelerator
from batchpilot.specs.model import load_model
from batchpilot.specs.settings import RunSettings

from ._checks import assert_one_line_error, run_cli, run_in_process

MEMORY = ["memory", "--model", "tiny-llama-1m", "--gpu", "h100-sxm", "--micro-batch", "1"]
PLAN = ["plan", "--model", "tiny-llama-1m", "--gpu", "h100-sxm"]
HUGE = "99999999999999999999"  # 10^20 - 1: parses as an int, far beyond every limit


def _request(**kwargs: object) -> PlanRequest:
    cluster = ClusterSpec(accelerator=load_accelerator("h100-sxm"), devices_per_node=8)
    return PlanRequest(model=load_model("tiny-llama-1m"), cluster=cluster, **kwargs)  # type: ignore[arg-type]


def test_the_hanging_plan_is_refused_in_one_line_within_seconds() -> None:
    """The installed script, as reported: it used to run for minutes; now one line and exit 2."""
    start = time.monotonic()
    done = run_cli([*PLAN, "--gpus", "8", "--seq-len", "1", "--global-batch-tokens", "4611686018427387903"],
                   timeout_s=60)
    assert time.monotonic() - start < 30  # process start-up included; the refusal itself is immediate
    assert done.returncode == 2, done
    assert done.stdout == ""
    assert_one_line_error(done.stderr, "--global-batch-tokens 4611686018427387903", "limit of 2^31 = 2147483648")


@pytest.mark.parametrize(("argv", "fragments"), [
    # counts beyond 2^62 are refused by the count parser itself, before the library's range check
    ([*MEMORY, "--seq-len", HUGE], (f"--seq-len '{HUGE}' is too large", "limit 2^62")),
    ([*MEMORY, "--seq-len", str(2**24 + 1)], ("--seq-len 16777217", "2^24")),
    ([*MEMORY, "--seq-len", "256", "--gpus", HUGE], (f"--gpus {HUGE}", "limit of 2^20 = 1048576")),
    ([*MEMORY, "--seq-len", "256", "--gpus", str(2**20 + 1)], ("--gpus 1048577", "2^20")),
    ([*MEMORY[:-1], HUGE, "--seq-len", "256"], (f"--micro-batch '{HUGE}' is too large", "limit 2^62")),
    ([*MEMORY, "--seq-len", "256", "--grad-accum", HUGE], (f"--grad-accum {HUGE}", "2^31")),
    ([*PLAN, "--gpus", "8", "--seq-len", HUGE, "--global-batch", "8"], (f"--seq-len '{HUGE}' is too large", "2^62")),
    ([*PLAN, "--gpus", "99999999999999999992", "--seq-len", "256", "--global-batch", "8"],
     ("--gpus 99999999999999999992", "2^20")),
    ([*PLAN, "--gpus", "8", "--seq-len", "256", "--global-batch", str(2**31 + 8)],
     ("global batch 2147483656 sequences", "2^31")),
    ([*PLAN, "--gpus", "8", "--seq-len", "1", "--global-batch-tokens", str(2**40), "--max-deviation", "5%"],
     ("--global-batch-tokens 1099511627776", "2^31")),
], ids=["memory seq-len 1e20", "memory seq-len 2^24+1", "memory gpus 1e20", "memory gpus 2^20+1",
        "memory micro-batch 1e20", "memory grad-accum 1e20", "plan seq-len 1e20", "plan gpus 1e20",
        "plan global-batch 2^31+8", "plan tokens 2^40 with deviation"])
def test_absurd_size_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str],
                                            fragments: tuple[str, ...]) -> None:
    code, stdout, stderr = run_in_process(argv, capsys)
    assert code == 2, (stdout, stderr)
    assert stdout == ""
    assert_one_line_error(stderr, *fragments)


def test_sizes_at_the_limits_are_accepted() -> None:
    """The limits are inclusive: 2^20 GPUs, 2^24 tokens, a 2^31-sequence target."""
    mem = analytic_memory(load_model("tiny-llama-1m"), RunSettings(), micro_batch=1, seq_len=MAX_SEQ_LEN_TOKENS,
                          dp=MAX_DEVICES, grad_accum=MAX_BATCH_SEQUENCES)
    assert mem.total_bytes > 0
    result = plan(_request(seq_len=1, global_batch_sequences=MAX_BATCH_SEQUENCES))
    best = result.plans[0].triad
    assert best.global_batch_sequences == MAX_BATCH_SEQUENCES
    assert best.micro_batch_sequences <= MAX_MICRO_BATCH


def test_library_refuses_the_same_limits() -> None:
    with pytest.raises(BatchpilotError, match=r"--seq-len 16777217 is above the limit of 2\^24"):
        _request(seq_len=MAX_SEQ_LEN_TOKENS + 1, global_batch_sequences=8)
    with pytest.raises(BatchpilotError, match=r"--dp 1048577 is above the limit of 2\^20"):
        analytic_memory(load_model("tiny-llama-1m"), RunSettings(), micro_batch=1, seq_len=64, dp=MAX_DEVICES + 1)


def test_micro_divisors_are_the_divisors_up_to_the_micro_batch_limit() -> None:
    """Same candidates as the full O(√n) enumeration filtered afterwards (what the planner did before)."""
    for n in [*range(1, 3000), 2**31 - 1, 2**31, 3 * 5 * 7 * 11 * 13 * 17 * 19 * 23, 1024 * 1021]:
        expected = [d for d in space._divisors(n) if d <= MAX_MICRO_BATCH]
        assert space._micro_divisors(n, None) == expected, n
        assert space._micro_divisors(n, n) == expected + ([n] if n > MAX_MICRO_BATCH else []), n


def test_a_pinned_micro_batch_above_the_search_range_is_still_used() -> None:
    result = plan(_request(seq_len=16, global_batch_sequences=8 * 2048, pins=Pins(micro_batch=2048)))
    assert {p.triad.micro_batch_sequences for p in result.plans} == {2048}
