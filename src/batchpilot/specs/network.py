"""Cluster networks: the fabrics between nodes and the NVLink domains larger than a node, with sources.

Examples::

    >>> from batchpilot.specs.network import load_network
    >>> ndr = load_network("ib-ndr")
    >>> ndr.per_gpu_bandwidth_bytes_per_s       # one 400 Gb/s port per GPU, one direction, link peak
    50000000000.0
    >>> round(ndr.achieved_fraction, 2)         # NCCL ring all-reduce busbw over the node's NIC sum
    0.94
    >>> load_network("p5").gpus_per_nic        # AWS EFA v2: 32 x 100 Gb/s for 8 GPUs
    0.25

    batchpilot hardware networks
    batchpilot hardware networks ib-ndr --json

Conventions (one data file per network under ``batchpilot/data/networks``):

- ``nic_bandwidth_bytes_per_s``: the LINK PEAK of one port (NIC) in ONE direction, decimal
  (400 Gb/s = 50e9 B/s). For a scale-up (NVLink) domain the "port" is one GPU's NVLink aggregate
  (NVLink 5: 1.8 TB/s bidirectional = 900e9 one way) and ``nics_per_node = gpus_per_node``.
- ``gpus_per_node`` / ``nics_per_node``: the node layout the figures belong to; for a scale-up domain
  the "node" is the NVLink domain (72 GPUs for GB200 NVL72). Per-GPU link peak =
  ``nic_bandwidth × nics_per_node / gpus_per_node`` (the ``inter_node_bandwidth_bytes_per_s`` of a
  :class:`~batchpilot.specs.hardware.ClusterSpec`).
- ``measured_all_reduce``: ACHIEVED (not link-peak) NCCL all-reduce bus bandwidth where a measurement
  was published, as ``nccl-tests`` reports it: ``busbw = algbw × 2(n−1)/n`` (NVIDIA/nccl-tests
  doc/PERFORMANCE.md at a0b82b2), with the nodes, GPUs, NICs, message size and algorithm it was
  measured with. The first entry is the one to model with (a ring where one was published); NVLS
  (NVLink SHARP) entries exceed the wire because the switch reduces. A multi-node ring's busbw
  approaches the node's NIC sum (each of NCCL's rings crosses the node boundary on another NIC), so
  :attr:`NetworkSpec.achieved_fraction` compares scale-out busbw with ``nic × nics_per_node`` and
  scale-up busbw with one GPU's link. Empty when nothing was published: a model then has to assume
  an efficiency, and says so.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, get_args

from batchpilot.errors import SpecError
from batchpilot.io import path_is, read_json_object
from batchpilot.names import resolve
from batchpilot.specs.figures import MAX_DEVICES, FigureSource

NetworkKind = Literal["infiniband", "roce", "efa", "gpudirect-tcp", "nvlink"]
Scope = Literal["scale-out", "scale-up"]
KINDS: tuple[str, ...] = get_args(NetworkKind)
SCOPES: tuple[str, ...] = get_args(Scope)

_BANDWIDTH_RANGE = (1e6, 1e14)  # 1 MB/s .. 100 TB/s, as the accelerator catalog
_MAX_MESSAGE_BYTES = 2**44  # 16 TiB


@dataclass(frozen=True, kw_only=True, slots=True)
class MeasuredAllReduce:
    """One published NCCL all-reduce measurement on a network (large messages)."""

    bus_bandwidth_bytes_per_s: float
    """``busbw`` as nccl-tests reports it (``algbw × 2(n−1)/n``), bytes/s."""
    gpus_per_node: int
    """GPUs per node (or per NVLink domain) in the measured job."""
    nics_per_node: int
    """Network ports per node in the measured job (may differ from the network's usual layout)."""
    nodes: int | None
    """Nodes in the measured job; None where the source does not say."""
    message_bytes: int | None
    """All-reduce message size the figure is read at; None where the source does not say."""
    algorithm: str
    """NCCL algorithm (``ring``, ``nvls``, ``tree``) or ``not stated``."""
    source: FigureSource
    """Where it was published (URL, what it says, an independent copy)."""

    def to_dict(self) -> dict[str, Any]:
        return {"bus_bandwidth_bytes_per_s": self.bus_bandwidth_bytes_per_s, "gpus_per_node": self.gpus_per_node,
                "nics_per_node": self.nics_per_node, "nodes": self.nodes, "message_bytes": self.message_bytes,
                "algorithm": self.algorithm, "source": self.source.to_dict()}


@dataclass(frozen=True, kw_only=True, slots=True)
class NetworkSpec:
    """A network between GPUs: a scale-out fabric between nodes, or a scale-up NVLink domain."""

    name: str
    """Catalog name (``ib-ndr``) or the user file's path."""
    display_name: str
    kind: NetworkKind
    scope: Scope
    """``scale-out`` (between nodes) or ``scale-up`` (one NVLink domain; may span nodes, as NVL72)."""
    gpus_per_node: int
    """GPUs sharing the node's ports (scale-up: GPUs in the NVLink domain)."""
    nics_per_node: int
    """Ports (NICs) per node (scale-up: one per GPU)."""
    nic_bandwidth_bytes_per_s: float
    """Link peak of one port, one direction, bytes/s."""
    measured_all_reduce: tuple[MeasuredAllReduce, ...] = ()
    """Published achieved all-reduce bus bandwidths; the first is the one to model with."""
    sources: Mapping[str, FigureSource] = field(default_factory=dict)
    """Source per figure (``nic_bandwidth_bytes_per_s``)."""
    notes: str = ""

    @property
    def per_gpu_bandwidth_bytes_per_s(self) -> float:
        """Link peak per GPU, one direction: ``nic × nics_per_node / gpus_per_node``."""
        return self.nic_bandwidth_bytes_per_s * self.nics_per_node / self.gpus_per_node

    @property
    def gpus_per_nic(self) -> float:
        """GPUs sharing one port (0.25 = four ports per GPU)."""
        return self.gpus_per_node / self.nics_per_node

    def link_peak_for(self, measured: MeasuredAllReduce) -> float:
        """The link peak a measurement's busbw is bounded by: the node's NIC sum (scale-out), one GPU's link
        (scale-up)."""
        if self.scope == "scale-up":
            return self.nic_bandwidth_bytes_per_s
        return self.nic_bandwidth_bytes_per_s * measured.nics_per_node

    @property
    def achieved_fraction(self) -> float | None:
        """First measurement's busbw over its link peak (:meth:`link_peak_for`); None when none is published."""
        if not self.measured_all_reduce:
            return None
        first = self.measured_all_reduce[0]
        return first.bus_bandwidth_bytes_per_s / self.link_peak_for(first)

    def to_dict(self) -> dict[str, Any]:
        """Stable JSON record (the ``hardware networks NAME --json`` contract)."""
        return {
            "name": self.name,
            "display_name": self.display_name,
            "kind": self.kind,
            "scope": self.scope,
            "gpus_per_node": self.gpus_per_node,
            "nics_per_node": self.nics_per_node,
            "nic_bandwidth_bytes_per_s": self.nic_bandwidth_bytes_per_s,
            "per_gpu_bandwidth_bytes_per_s": self.per_gpu_bandwidth_bytes_per_s,
            "gpus_per_nic": self.gpus_per_nic,
            "measured_all_reduce": [m.to_dict() for m in self.measured_all_reduce],
            "achieved_fraction": self.achieved_fraction,
            "sources": {k: v.to_dict() for k, v in self.sources.items()},
            "notes": self.notes,
        }


# ---------------------------------------------------------------------- reading files
def _number(where: str, key: str, value: Any, limits: tuple[float, float]) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpecError(f"{where}: {key} must be a finite number, got {value!r}")
    if not limits[0] <= value <= limits[1]:
        raise SpecError(f"{where}: {key} = {value:g} is outside the plausible range "
                        f"[{limits[0]:g}, {limits[1]:g}]; check its unit")
    return float(value)


def _count(where: str, key: str, value: Any, *, limit: int = MAX_DEVICES) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise SpecError(f"{where}: {key} must be a whole number in [1, {limit}], got {value!r}")
    return value


def _optional_count(where: str, key: str, value: Any, *, limit: int = MAX_DEVICES) -> int | None:
    return None if value is None else _count(where, key, value, limit=limit)


def _text(where: str, key: str, value: Any, *, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()) or len(value) > 10_000:
        raise SpecError(f"{where}: {key} must be a non-empty string of at most 10000 characters, got {value!r}")
    return value


def _choice(where: str, key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise SpecError(f"{where}: {key} must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _source(where: str, key: str, raw: Mapping[str, Any]) -> FigureSource:
    return FigureSource(url=_text(where, f"{key}.source", raw.get("source")),
                        says=_text(where, f"{key}.says", raw.get("says"), required=False),
                        verified_via=_text(where, f"{key}.verified_via", raw.get("verified_via"), required=False))


def _unknown_keys(where: str, raw: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(str(k) if str(k).isprintable() else repr(str(k))
                     for k in raw if k not in known and not str(k).startswith("_"))
    if unknown:
        raise SpecError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


_MEASURED_KEYS = {"bus_bandwidth_bytes_per_s", "gpus_per_node", "nics_per_node", "nodes", "message_bytes",
                  "algorithm", "source", "says", "verified_via"}


def _measured(where: str, raw: Any) -> MeasuredAllReduce:
    if not isinstance(raw, Mapping):
        raise SpecError(f"{where}: each measured_all_reduce entry must be an object, got {raw!r}")
    _unknown_keys(where, raw, _MEASURED_KEYS)
    return MeasuredAllReduce(
        bus_bandwidth_bytes_per_s=_number(where, "bus_bandwidth_bytes_per_s", raw.get("bus_bandwidth_bytes_per_s"),
                                          _BANDWIDTH_RANGE),
        gpus_per_node=_count(where, "gpus_per_node", raw.get("gpus_per_node")),
        nics_per_node=_count(where, "nics_per_node", raw.get("nics_per_node")),
        nodes=_optional_count(where, "nodes", raw.get("nodes")),
        message_bytes=_optional_count(where, "message_bytes", raw.get("message_bytes"), limit=_MAX_MESSAGE_BYTES),
        algorithm=_text(where, "algorithm", raw.get("algorithm")),
        source=_source(where, "measurement", raw),
    )


_KEYS = {"name", "display_name", "kind", "scope", "gpus_per_node", "nics_per_node", "nic_bandwidth_bytes_per_s",
         "measured_all_reduce", "notes"}


def network_from_dict(data: Mapping[str, Any], *, name: str) -> NetworkSpec:
    """Build a :class:`NetworkSpec` from a parsed network JSON object (``_``-prefixed keys, such as the catalog's
    ``_aliases``, are not part of the spec)."""
    where = name
    _unknown_keys(where, data, _KEYS)
    raw_nic = data.get("nic_bandwidth_bytes_per_s")
    sources: dict[str, FigureSource] = {}
    if isinstance(raw_nic, Mapping):
        _unknown_keys(f"{where}: nic_bandwidth_bytes_per_s", raw_nic, {"value", "source", "says", "verified_via"})
        if "source" in raw_nic:
            sources["nic_bandwidth_bytes_per_s"] = _source(where, "nic_bandwidth_bytes_per_s", raw_nic)
        raw_nic = raw_nic.get("value")
    measured = data.get("measured_all_reduce", [])
    if not isinstance(measured, list):
        raise SpecError(f"{where}: measured_all_reduce must be a list, got {measured!r}")
    return NetworkSpec(
        name=name,
        display_name=_text(where, "display_name", data.get("display_name", name)),
        kind=_choice(where, "kind", data.get("kind"), KINDS),  # type: ignore[arg-type]
        scope=_choice(where, "scope", data.get("scope"), SCOPES),  # type: ignore[arg-type]
        gpus_per_node=_count(where, "gpus_per_node", data.get("gpus_per_node")),
        nics_per_node=_count(where, "nics_per_node", data.get("nics_per_node")),
        nic_bandwidth_bytes_per_s=_number(where, "nic_bandwidth_bytes_per_s", raw_nic, _BANDWIDTH_RANGE),
        measured_all_reduce=tuple(_measured(f"{where}: measured_all_reduce[{i}]", m) for i, m in enumerate(measured)),
        sources=sources,
        notes=_text(where, "notes", data.get("notes"), required=False),
    )


def _catalog_dir() -> Path:
    return Path(str(resources.files("batchpilot") / "data" / "networks"))


def network_names() -> list[str]:
    """Names of the shipped networks, sorted."""
    return sorted(p.stem for p in _catalog_dir().glob("*.json"))


@functools.lru_cache(maxsize=1)
def network_aliases() -> Mapping[str, str]:
    """Other names of shipped networks (each file's ``_aliases``: ``p5`` → ``efa-p5``, ``ndr`` → ``ib-ndr``)."""
    aliases: dict[str, str] = {}
    for name in network_names():
        raw = read_json_object(_catalog_dir() / f"{name}.json", "network catalog file").get("_aliases", [])
        aliases.update((str(alias), name) for alias in raw)
    return MappingProxyType(aliases)


def load_network(name_or_path: str | Path) -> NetworkSpec:
    """A catalog name or alias (matched as :mod:`batchpilot.names` says: ``NDR`` is ``ib-ndr``, ``efa`` asks which)
    or the path of a user JSON file in the same format."""
    text = str(name_or_path).strip()
    path = Path(text)
    if path.suffix == ".json" or "/" in text or "\\" in text or path_is(path, "is_file"):
        return network_from_dict(read_json_object(path, "network file"), name=text)
    key = resolve("network", text, network_names(), network_aliases())
    return network_from_dict(read_json_object(_catalog_dir() / f"{key}.json", "network catalog file"), name=key)
