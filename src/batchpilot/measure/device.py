"""Which device a probe runs on, and how much memory it has by default."""

from __future__ import annotations

from batchpilot.errors import BatchpilotError
from batchpilot.measure.probe_types import Device


def resolve_device(device: str) -> Device:
    """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without one is an error."""
    if device not in ("auto", "cpu", "cuda"):
        raise BatchpilotError(f"--device {device!r} is not one of: auto, cpu, cuda")
    if device == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise BatchpilotError("--device cuda: torch sees no CUDA device here; use --device cpu or auto")
    return "cpu"


def device_memory_bytes(device: Device) -> int:
    """Default budget: CPU ``MemAvailable`` (/proc/meminfo); CUDA the device's free memory once this
    process's CUDA context exists (``torch.cuda.mem_get_info``), i.e. what the allocator can get."""
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(torch.cuda.current_device())[0])
    with open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise BatchpilotError("cannot read MemAvailable from /proc/meminfo; pass --memory-budget")
