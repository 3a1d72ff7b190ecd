"""The accelerator catalog and the cluster spec: every hardware figure with its source.

Examples::

    >>> from batchpilot.specs.hardware import load_accelerator, ClusterSpec
    >>> h100 = load_accelerator("h100-sxm")
    >>> h100.peak_flops_per_s("bf16")       # dense (no 2:4 sparsity), from the datasheet
    989500000000000.0
    >>> ClusterSpec(accelerator=h100, devices_per_node=8, num_nodes=4,
    ...             inter_node_bandwidth_bytes_per_s=50e9).total_devices
    32

    batchpilot hardware list
    batchpilot hardware show h100-sxm --json
    batchpilot hardware show ./my-gpu.json

Conventions (one per figure, stated in every data file under ``batchpilot/data/accelerators``):

- ``memory_bytes``: the vendor's nominal capacity, read in BINARY units (NVIDIA "80GB" = 80 GiB =
  85,899,345,920 B). DRAM comes in power-of-two densities and the drivers agree: ``nvidia-smi``
  reports A100 80GB as 81920 MiB (exactly 80 GiB) and A100 40GB as 40960 MiB (modal-labs/modal-client
  PR #2797); ``cudaGetDeviceProperties`` on an A100-SXM4-40GB reports 42,298,834,944 B
  (bottlerocket-os/bottlerocket PR #3873), more than 40e9, so the decimal reading would be wrong. What a
  process can allocate is somewhat less (driver reservation, ECC on GDDR parts, the CUDA context); the
  memory estimate subtracts that explicitly, the catalog does not.
- ``peak_flops_per_s``: DENSE peak per dtype. NVIDIA datasheets print tensor-core figures "with
  sparsity" (2:4 structured) and footnote that dense is one half; AMD prints both. ``fp32`` is the
  plain (non-tensor) FP32 rate; ``tf32``/``bf16``/``fp16``/``fp8`` are matrix-unit rates with FP32
  accumulation where the vendor distinguishes (GeForce parts accumulate FP16 faster than FP32).
  A dtype the device has no matrix support for is absent, and asking for it is an error.
- ``memory_bandwidth_bytes_per_s``: peak DRAM bandwidth, decimal (TB/s = 1e12 B/s), as vendors mean it.
- ``intra_node_bandwidth_bytes_per_s``: per-GPU UNIDIRECTIONAL bandwidth to the other GPUs of its node
  (NVLink / Infinity Fabric aggregate, or PCIe where there is no GPU fabric). Vendors print the
  bidirectional sum (H100 "NVLink 900GB/s" = 450 GB/s each way); we store half. ``intra_node_link``
  names the link.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from batchpilot.errors import SpecError
from batchpilot.io import path_is, read_json_object
from batchpilot.names import resolve
from batchpilot.specs.figures import MAX_DEVICES, FigureSource

if TYPE_CHECKING:
    from batchpilot.specs.network import NetworkSpec

Dtype = Literal["fp32", "tf32", "bf16", "fp16", "fp8"]
DTYPES: tuple[Dtype, ...] = ("fp32", "tf32", "bf16", "fp16", "fp8")

#: Other spellings of the same dtype (torch names, common abbreviations).
DTYPE_ALIASES: Mapping[str, Dtype] = MappingProxyType({
    "float32": "fp32", "fp32": "fp32", "f32": "fp32",
    "tf32": "tf32", "tensorfloat32": "tf32",
    "bfloat16": "bf16", "bf16": "bf16",
    "float16": "fp16", "fp16": "fp16", "half": "fp16", "f16": "fp16",
    "fp8": "fp8", "float8": "fp8", "e4m3": "fp8", "float8_e4m3fn": "fp8",
})

# Plausibility limits for user files: generous enough for any real device for years, tight enough to
# catch unit slips (TFLOP/s given as FLOP/s, GB given as bytes) and hostile values.
_MEMORY_RANGE = (2**20, 2**44)           # 1 MiB .. 16 TiB
_FLOPS_RANGE = (1e9, 1e18)               # 1 GFLOP/s .. 1 EFLOP/s
_BANDWIDTH_RANGE = (1e6, 1e14)           # 1 MB/s .. 100 TB/s
_MAX_DEVICES = MAX_DEVICES


@dataclass(frozen=True, kw_only=True, slots=True)
class AcceleratorSpec:
    """One accelerator model (see the module docstring for the convention behind each figure)."""

    name: str
    """Catalog name (``h100-sxm``) or the user file's path."""
    display_name: str
    """The vendor's product name, with form factor (``NVIDIA H100 SXM5 80GB``)."""
    vendor: str
    memory_bytes: int
    """Nominal device memory in bytes, binary reading (80GB → 80·2^30)."""
    peak_flops: Mapping[str, float]
    """Dense peak FLOP/s per dtype (keys from ``DTYPES``); a missing dtype is unsupported."""
    memory_bandwidth_bytes_per_s: float
    """Peak DRAM bandwidth in bytes/s."""
    intra_node_bandwidth_bytes_per_s: float
    """Per-GPU unidirectional bandwidth to the other GPUs of the node, bytes/s."""
    intra_node_link: str
    """Which link that is (``NVLink 4 (18 links)``, ``PCIe Gen4 x16``, ...)."""
    sources: Mapping[str, FigureSource] = field(default_factory=dict)
    """Source per figure, keyed ``memory_bytes``, ``peak_flops.bf16``, ``memory_bandwidth_bytes_per_s``,
    ``intra_node_bandwidth_bytes_per_s``."""
    notes: str = ""

    def peak_flops_per_s(self, dtype: str) -> float:
        """Dense peak FLOP/s for ``dtype`` (``bf16``, ``bfloat16``, ``fp8``, ...); unsupported → SpecError."""
        canonical = DTYPE_ALIASES.get(str(dtype).strip().lower())
        if canonical is None:
            raise SpecError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        value = self.peak_flops.get(canonical)
        if value is None:
            have = ", ".join(d for d in DTYPES if d in self.peak_flops)
            raise SpecError(
                f"{self.name} has no {canonical} matrix throughput (it supports {have}); "
                f"pick a precision it supports or another accelerator"
            )
        return value

    @property
    def supported_dtypes(self) -> tuple[str, ...]:
        return tuple(d for d in DTYPES if d in self.peak_flops)

    def figure_names(self) -> list[str]:
        """Every figure this spec carries, in the keys ``sources`` uses."""
        flops = [f"peak_flops.{d}" for d in self.supported_dtypes]
        return ["memory_bytes", *flops, "memory_bandwidth_bytes_per_s", "intra_node_bandwidth_bytes_per_s"]

    def to_dict(self) -> dict[str, Any]:
        """Stable JSON record (the ``hardware show --json`` contract)."""
        return {
            "name": self.name,
            "display_name": self.display_name,
            "vendor": self.vendor,
            "memory_bytes": self.memory_bytes,
            "peak_flops_per_s": {d: self.peak_flops[d] for d in self.supported_dtypes},
            "memory_bandwidth_bytes_per_s": self.memory_bandwidth_bytes_per_s,
            "intra_node_bandwidth_bytes_per_s": self.intra_node_bandwidth_bytes_per_s,
            "intra_node_link": self.intra_node_link,
            "sources": {k: self.sources[k].to_dict() for k in self.figure_names() if k in self.sources},
            "notes": self.notes,
        }


def check_device_count(gpus: int, flag: str = "--gpus") -> int:
    """``gpus`` if it is a whole number in [1, :data:`MAX_DEVICES`]; one-line error otherwise."""
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise SpecError(f"{flag} {gpus!r} must be a positive integer")
    if gpus > MAX_DEVICES:
        raise SpecError(f"{flag} {gpus} is above the limit of 2^20 = {MAX_DEVICES} GPUs; use a real cluster size")
    return gpus


@dataclass(frozen=True, kw_only=True, slots=True)
class ClusterSpec:
    """A homogeneous cluster: ``num_nodes`` nodes of ``devices_per_node`` identical accelerators."""

    accelerator: AcceleratorSpec
    devices_per_node: int
    """GPUs per node sharing the intra-node fabric (8 on HGX/DGX boards)."""
    num_nodes: int = 1
    inter_node_bandwidth_bytes_per_s: float | None = None
    """Per-GPU unidirectional network bandwidth between nodes (one 400 Gb/s NIC per GPU = 50e9 B/s).
    Required when ``num_nodes > 1``."""
    network: NetworkSpec | None = None
    """The scale-out fabric between nodes (:mod:`batchpilot.specs.network`), whose measured achieved bandwidth
    the step-time model uses; None: not named (the model then states which network's figure it assumes)."""

    def __post_init__(self) -> None:
        for what, value in (("devices_per_node", self.devices_per_node), ("num_nodes", self.num_nodes)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_DEVICES:
                raise SpecError(f"cluster {what} must be a whole number in [1, {_MAX_DEVICES}], got {value!r}")
        bw = self.inter_node_bandwidth_bytes_per_s
        if bw is None:
            if self.num_nodes > 1:
                raise SpecError(
                    f"a cluster of {self.num_nodes} nodes needs inter_node_bandwidth_bytes_per_s "
                    f"(per GPU, one direction; e.g. 50e9 for one 400 Gb/s NIC per GPU)"
                )
        else:
            _check_number("cluster", "inter_node_bandwidth_bytes_per_s", bw, _BANDWIDTH_RANGE)

    @property
    def total_devices(self) -> int:
        """``devices_per_node × num_nodes``."""
        return self.devices_per_node * self.num_nodes

    def to_dict(self) -> dict[str, Any]:
        return {
            "accelerator": self.accelerator.name,
            "devices_per_node": self.devices_per_node,
            "num_nodes": self.num_nodes,
            "total_devices": self.total_devices,
            "inter_node_bandwidth_bytes_per_s": self.inter_node_bandwidth_bytes_per_s,
            "intra_node_bandwidth_bytes_per_s": self.accelerator.intra_node_bandwidth_bytes_per_s,
            "network": None if self.network is None else self.network.name,
        }


# ---------------------------------------------------------------------- reading files
def _check_number(where: str, key: str, value: Any, limits: tuple[float, float]) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{where}: {key} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise SpecError(f"{where}: {key} must be finite, got {value!r}")
    low, high = limits
    if not low <= value <= high:
        raise SpecError(f"{where}: {key} = {value:g} is outside the plausible range [{low:g}, {high:g}]; check its unit")
    return float(value)


def _check_text(where: str, key: str, value: Any, *, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise SpecError(f"{where}: {key} must be a non-empty string, got {value!r}")
    if len(value) > 10_000:
        raise SpecError(f"{where}: {key} is longer than 10000 characters")
    return value


def _read_figure(where: str, key: str, raw: Any) -> tuple[Any, FigureSource | None]:
    """A figure is a plain number, or ``{"value": n, "source": url, "says": text, "dense": bool}``."""
    if not isinstance(raw, Mapping):
        return raw, None
    value = raw.get("value")
    if "source" not in raw:
        return value, None
    dense = raw.get("dense")
    if dense is not None and not isinstance(dense, bool):
        raise SpecError(f"{where}: {key}.dense must be true or false, got {dense!r}")
    source = FigureSource(
        url=_check_text(where, f"{key}.source", raw.get("source")),
        says=_check_text(where, f"{key}.says", raw.get("says", ""), required=False),
        dense=dense,
        verified_via=_check_text(where, f"{key}.verified_via", raw.get("verified_via", ""), required=False),
    )
    return value, source


def _read_flops(where: str, raw: Any, sources: dict[str, FigureSource]) -> dict[str, float]:
    if not isinstance(raw, Mapping) or not raw:
        raise SpecError(f"{where}: peak_flops_per_s must be an object of dtype → FLOP/s, got {raw!r}")
    flops: dict[str, float] = {}
    for dtype, entry in raw.items():
        if dtype not in DTYPES:
            raise SpecError(f"{where}: peak_flops_per_s has unknown dtype {dtype!r}; use {', '.join(DTYPES)}")
        value, source = _read_figure(where, f"peak_flops_per_s.{dtype}", entry)
        flops[dtype] = _check_number(where, f"peak_flops_per_s.{dtype}", value, _FLOPS_RANGE)
        if source is not None:
            if source.dense is False:
                raise SpecError(f"{where}: peak_flops_per_s.{dtype} must be the dense figure (dense: true)")
            sources[f"peak_flops.{dtype}"] = source
    return flops


def _read_sources(where: str, raw: Any, sources: dict[str, FigureSource], flops: Mapping[str, float]) -> None:
    """The ``sources`` object of :meth:`AcceleratorSpec.to_dict` (what ``hardware show --json`` prints):
    figure key → ``{"url", "says", "dense", "verified_via"}``, merged into ``sources``."""
    if raw is None:
        return
    if not isinstance(raw, Mapping):
        raise SpecError(f"{where}: sources must be an object of figure → source, got {raw!r}")
    figures = {"memory_bytes", "memory_bandwidth_bytes_per_s", "intra_node_bandwidth_bytes_per_s",
               *(f"peak_flops.{d}" for d in flops)}
    for key, entry in raw.items():
        if key not in figures:
            raise SpecError(f"{where}: sources names {str(key)!r}, not a figure of this file; figures: "
                            f"{', '.join(sorted(figures))}")
        if not isinstance(entry, Mapping):
            raise SpecError(f"{where}: sources.{key} must be an object with url and says, got {entry!r}")
        if key in sources:
            raise SpecError(f"{where}: the source of {key} is given twice (inline and in sources); keep one")
        dense = entry.get("dense")
        if dense is not None and not isinstance(dense, bool):
            raise SpecError(f"{where}: sources.{key}.dense must be true or false, got {dense!r}")
        if key.startswith("peak_flops.") and dense is False:
            raise SpecError(f"{where}: {key} must be the dense figure (dense: true)")
        source = FigureSource(
            url=_check_text(where, f"sources.{key}.url", entry.get("url")),
            says=_check_text(where, f"sources.{key}.says", entry.get("says", ""), required=False),
            dense=dense,
            verified_via=_check_text(where, f"sources.{key}.verified_via", entry.get("verified_via", ""),
                                     required=False),
        )
        sources[key] = source


def accelerator_from_dict(data: Mapping[str, Any], *, name: str) -> AcceleratorSpec:
    """Build an :class:`AcceleratorSpec` from a parsed accelerator JSON object: a catalog file (each figure
    ``{"value", "source", "says", …}``) or what :meth:`AcceleratorSpec.to_dict` writes (plain figures and a
    ``sources`` object), so ``hardware show NAME --json > gpu.json`` loads back with ``--gpu gpu.json``."""
    where = name
    known = {"name", "display_name", "vendor", "memory_bytes", "peak_flops_per_s",
             "memory_bandwidth_bytes_per_s", "intra_node_bandwidth_bytes_per_s", "intra_node_link", "notes",
             "sources"}
    unknown = sorted(str(k) if str(k).isprintable() else repr(str(k))  # no raw newlines or escapes in messages
                     for k in data if k not in known and not str(k).startswith("_"))
    if unknown:
        raise SpecError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    sources: dict[str, FigureSource] = {}

    def figure(key: str, limits: tuple[float, float]) -> float:
        if key not in data:
            raise SpecError(f"{where}: required field {key!r} is missing")
        value, source = _read_figure(where, key, data[key])
        if source is not None:
            sources[key] = source
        return _check_number(where, key, value, limits)

    memory = figure("memory_bytes", _MEMORY_RANGE)
    if not memory.is_integer():
        raise SpecError(f"{where}: memory_bytes must be a whole number of bytes, got {memory!r}")
    peak_flops = _read_flops(where, data.get("peak_flops_per_s"), sources)
    memory_bandwidth = figure("memory_bandwidth_bytes_per_s", _BANDWIDTH_RANGE)
    intra_node_bandwidth = figure("intra_node_bandwidth_bytes_per_s", _BANDWIDTH_RANGE)
    _read_sources(where, data.get("sources"), sources, peak_flops)
    return AcceleratorSpec(
        name=name,
        display_name=_check_text(where, "display_name", data.get("display_name", name)),
        vendor=_check_text(where, "vendor", data.get("vendor", "unknown")),
        memory_bytes=int(memory),
        peak_flops=MappingProxyType(peak_flops),
        memory_bandwidth_bytes_per_s=memory_bandwidth,
        intra_node_bandwidth_bytes_per_s=intra_node_bandwidth,
        intra_node_link=_check_text(where, "intra_node_link", data.get("intra_node_link", "unspecified")),
        sources=MappingProxyType(sources),
        notes=_check_text(where, "notes", data.get("notes", ""), required=False),
    )


def _catalog_dir() -> Path:
    return Path(str(resources.files("batchpilot") / "data" / "accelerators"))


def accelerator_names() -> list[str]:
    """Names of the shipped accelerators, sorted."""
    return sorted(p.stem for p in _catalog_dir().glob("*.json"))


@functools.lru_cache(maxsize=1)
def accelerator_aliases() -> Mapping[str, str]:
    """Other names of shipped accelerators (each file's ``_aliases``: ``a6000`` → ``rtx-a6000``)."""
    aliases: dict[str, str] = {}
    for name in accelerator_names():
        raw = read_json_object(_catalog_dir() / f"{name}.json", "accelerator catalog file").get("_aliases", [])
        aliases.update((str(alias), name) for alias in raw)
    return MappingProxyType(aliases)


def load_accelerator(name_or_path: str | Path) -> AcceleratorSpec:
    """A catalog name or the path of a user JSON file in the same format.

    Names match as :mod:`batchpilot.names` says (case, separators, aliases, whole-word prefixes: ``H100 SXM`` is
    ``h100-sxm``); a prefix of several (``h100``) is an error that lists them, never a pick.
    """
    text = str(name_or_path).strip()
    path = Path(text)
    if path.suffix == ".json" or "/" in text or "\\" in text or path_is(path, "is_file"):
        data = read_json_object(path, "accelerator file")
        return accelerator_from_dict(data, name=text)
    key = resolve("accelerator", text, accelerator_names(), accelerator_aliases())
    data = read_json_object(_catalog_dir() / f"{key}.json", "accelerator catalog file")
    return accelerator_from_dict(data, name=key)
