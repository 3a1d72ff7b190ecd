"""Trial internals that run without a GPU: OOM classification and the ranks' agreement (gloo on CPU)."""

from __future__ import annotations

import multiprocessing
import os
import socket

import pytest

torch = pytest.importorskip("torch")

from batchpilot.measure._trial import agree_across_ranks, is_oom  # noqa: E402


class OutOfMemoryError(RuntimeError):
    """Stands in for ``torch.OutOfMemoryError`` (CUDA-only to raise); classified by its name."""


def test_is_oom() -> None:
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                       "memory: you tried to allocate 83886080 bytes. Error code 12 (Cannot allocate memory)")
    assert is_oom(cpu)
    assert is_oom(MemoryError())
    assert is_oom(OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("std::bad_alloc"))
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"))
    assert not is_oom(ValueError("can't allocate memory"))  # only allocator exception types count


def test_single_process_agreement_is_the_identity() -> None:
    assert agree_across_ranks(True, 123, 4.5, torch.device("cpu")) == (True, 123, 4.5)


def _rank(rank: int, port: int, out: multiprocessing.Queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # rank 1 ran out of memory; rank 0 fitted at 100 bytes and 250 tokens/s
        verdict = agree_across_ranks(rank == 1, 100 * (1 - rank), 250.0 if rank == 0 else 0.0, torch.device("cpu"))
        out.put((rank, verdict))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_agree_on_failure() -> None:
    """Two gloo ranks: one fails, so both see the failure — neither goes on to a step the other skips."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert results[0][0] is True and results[1][0] is True
    assert results[0][1] == results[1][1] == 100  # the largest peak
    assert results[0][2] == results[1][2] == 0.0  # the slowest rank's tokens/s


def test_optimizer_state_on_one_thread_then_the_pool_as_it_was() -> None:
    """The state is created on one intra-op thread; the count and the process's threads are as before."""
    from batchpilot.measure._trial import _one_intra_op_thread
    from batchpilot.measure.step import materialise_optimizer_state

    def threads() -> int:
        with open("/proc/self/status", encoding="ascii") as fh:
            return int(next(line for line in fh if line.startswith("Threads:")).split()[1])

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = torch.nn.Linear(512, 512)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        torch.ones(256, 256) @ torch.ones(256, 256)  # the pool is up, as in a trial
        os_threads = threads()
        with _one_intra_op_thread(torch.device("cpu")):
            assert torch.get_num_threads() == 1
            materialise_optimizer_state(model, opt)
        assert torch.get_num_threads() == 2
        assert threads() == os_threads
        state = opt.state[model.weight]
        assert torch.count_nonzero(state["exp_avg"]) == 0 and state["exp_avg_sq"].shape == (512, 512)
        assert model.weight.grad is None  # the zero gradients were dropped
    finally:
        torch.set_num_threads(before)
