"""Processes: the torchrun environment, collectives of the loop, and launching torchrun locally (the model's
layout — DDP, FSDP2, tensor parallelism — is :mod:`batchpilot.train.parallelize`).

The same ``batchpilot train`` command runs

- alone (one process, no process group);
- under torchrun or any launcher that sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``
  (multi-node included): a process group is created, NCCL on CUDA, gloo on CPU;
- with ``--nproc N``: :func:`launch_torchrun` starts ``torchrun --standalone --nproc-per-node N`` on
  :mod:`batchpilot.train.worker` and follows the workers' ``metrics.jsonl``.

``expected_world_size`` guards against launchers that silently start a single process: the run
fails before touching the model when ``WORLD_SIZE`` differs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn

from batchpilot.errors import BatchpilotError


class LaunchError(BatchpilotError):
    """The process layout is not the one asked for, or torchrun failed."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DistEnv:
    """This process's place in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


CPU_ENV_FOR_TESTS = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
"""A single CPU process, for building a Trainer without a launcher."""


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    try:
        return int(value)
    except ValueError:  # a hand-set WORLD_SIZE=abc: one line, not int()'s traceback
        raise LaunchError(f"environment variable {name}={value!r} is not an integer; unset it or let the launcher "
                          f"(torchrun) set it") from None


def elastic_restart_count() -> int:
    """How many times torchrun has restarted this worker group (``TORCHELASTIC_RESTART_COUNT``; 0 when
    not under torchrun or on the first attempt)."""
    return env_int("TORCHELASTIC_RESTART_COUNT", 0)


def pick_device(preference: str, local_rank: int) -> torch.device:
    """``cuda:<local_rank>`` when asked for (or available under ``auto``), else ``cpu``."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise LaunchError("--device cuda was requested but torch.cuda.is_available() is False")
    if preference in ("cuda", "auto") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def check_world_size(expected: int | None) -> int:
    """``WORLD_SIZE`` from the environment (1 when unset), checked against ``expected``."""
    world = env_int("WORLD_SIZE", 1)
    slurm_tasks = env_int("SLURM_NTASKS", 1)
    if "WORLD_SIZE" not in os.environ and slurm_tasks > 1 and expected not in (None, 1):
        raise LaunchError(
            f"SLURM started {slurm_tasks} tasks but WORLD_SIZE is unset; launch each task through torchrun "
            f"or export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT"
        )
    if expected is not None and world != expected:
        raise LaunchError(
            f"expected a world size of {expected} but the launcher started {world} process(es) "
            f"(WORLD_SIZE={os.environ.get('WORLD_SIZE', 'unset')}); check --nproc-per-node/--nnodes"
        )
    return world


def init_distributed(*, expected_world_size: int | None, device: str) -> DistEnv:
    """Read the launcher's environment and create the process group when there is more than one rank."""
    world = check_world_size(expected_world_size)
    rank, local_rank = env_int("RANK", 0), env_int("LOCAL_RANK", 0)
    dev = pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        _init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world, device=dev)


def _init_process_group(backend: str, *, rank: int, world_size: int) -> None:
    """``init_process_group`` from the launcher's environment; under torchrun's agent store, in a key
    space of this attempt.

    torchrun (``TORCHELASTIC_USE_AGENT_STORE=True``, e.g. ``--standalone``) gives every attempt of a
    restarted worker group the same agent TCPStore without a per-attempt prefix, so the process group's
    keys from the failed attempt are still there: a restarted rank can read a dead rank's gloo address and
    time out connecting to it ("Connection refused", seen in about one restart in three on a loaded
    2-core machine). A ``PrefixStore`` per attempt (``TORCHELASTIC_RESTART_COUNT``) keeps attempts apart."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend=backend)
        return
    timeout = dist.default_pg_timeout  # what init_process_group uses by default
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timeout)
    attempt_store = dist.PrefixStore(f"batchpilot/attempt-{elastic_restart_count()}", store)
    dist.init_process_group(backend=backend, store=attempt_store, rank=rank, world_size=world_size, timeout=timeout)


def shutdown() -> None:
    """Tear the process group down after every rank got here (gloo aborted sometimes when one rank
    destroyed its group while the other still had FSDP2 collectives in flight)."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DDP wrapper (FSDP2 modifies the module in place)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the cross-rank gradient reduction of this backward unless ``enabled`` (DDP ``no_sync``;
    FSDP2 ``set_requires_gradient_sync``)."""
    set_sync: Any = getattr(model, "set_requires_gradient_sync", None)
    no_sync: Any = getattr(model, "no_sync", None)
    if set_sync is not None:
        set_sync(enabled)
        yield
    elif enabled or no_sync is None:
        yield
    else:
        with no_sync():
            yield


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Element-wise sum of small float64 vectors across ranks (identity on one process)."""
    if not env.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_gradients(model: nn.Module, env: DistEnv) -> None:
    """Average ``p.grad`` over ranks by hand (used when a hook needed the rank-local gradients)."""
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(env.world_size)


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]


def die_with_parent(prctl: Callable[..., int] | None = None) -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies (``PR_SET_PDEATHSIG`` = 1).

    torchrun starts each rank in its own session, so a ``kill -9`` of the launcher's process group would
    leave torchrun's ranks training on as orphans; with this set in torchrun (by the launcher) and in each
    rank (by the worker) the whole tree goes. A parent already gone before the call (re-parented to 1)
    exits at once. Elsewhere a no-op. ``prctl`` resolved before a fork keeps the child free of dlopen."""
    prctl = prctl or _prctl()
    if prctl is None:
        return
    prctl(1, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        os._exit(1)


def exit_skipping_teardown(code: int) -> NoReturn:
    """Exit a torchrun rank with ``code`` without the interpreter's C++ teardown: gloo's background
    threads can abort an ordinary exit ("terminate called without an active exception", SIGABRT) after
    a run that finished cleanly. The caller has closed (or atomically renamed) everything it wrote."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def launch_torchrun(config_dict: dict[str, Any], nproc: int, out_dir: Path,
                    on_record: Callable[[dict[str, Any]], None] | None = None, *, max_restarts: int = 0) -> int:
    """Run :mod:`batchpilot.train.worker` under ``torchrun --standalone --nproc-per-node nproc
    --max-restarts max_restarts`` (a failed worker group is started again up to ``max_restarts`` times;
    each restart resumes from the last checkpoint, see :func:`elastic_restart_count`).

    The config goes to ``out_dir/launch-config.json``; new lines of ``metrics.jsonl`` are passed to
    ``on_record`` while the workers run. Returns torchrun's exit code.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / "launch-config.json"
    config_path.write_text(json.dumps(config_dict), encoding="utf-8")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               f"--max-restarts={max_restarts}", "-m", "batchpilot.train.worker", str(config_path)]
    metrics = out_dir / "metrics.jsonl"
    start = 0
    prctl = _prctl()  # resolved here: the forked child only calls it
    with subprocess.Popen(command, preexec_fn=lambda: die_with_parent(prctl)) as proc:
        while True:
            code = proc.poll()
            start = _follow(metrics, start, on_record)
            if code is not None:
                return code
            time.sleep(0.5)


def _follow(path: Path, offset: int, on_record: Callable[[dict[str, Any]], None] | None) -> int:
    if on_record is None or not path.exists():
        return offset
    with path.open("rb") as handle:
        handle.seek(min(offset, path.stat().st_size))
        data = handle.read()
    complete = data[: data.rfind(b"\n") + 1]
    for line in complete.splitlines():
        if line.strip():
            on_record(json.loads(line))
    return offset + len(complete)
