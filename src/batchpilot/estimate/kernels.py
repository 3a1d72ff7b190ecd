"""Kernel profiles: what one GPU generation's kernels achieve, from published microbenchmarks.

The per-op step-time model (:mod:`batchpilot.estimate.layer_time`) times every kernel of a training step
as a fraction of the accelerator's datasheet figures. The fractions belong to a GPU *generation* (same
tensor cores, same kernels) and live in one data file per generation under
``batchpilot/data/kernel_profiles`` (``ampere``, ``hopper``, ``blackwell``, ``cdna3``, and ``generic`` for
any accelerator without a profile), every figure with its source:

- ``gemm_efficiency``: the best fraction of the dense peak a GEMM reaches per dtype (the "maximum
  achievable matmul FLOPS" of a shape sweep). A GEMM of M×N×K then takes
  ``max(2MNK / (peak × e), bytes / (HBM × e_mem))`` (a roofline: short GEMMs — small micro-batches,
  experts receiving few tokens — are bound by reading their weights).
- ``memory_efficiency``: the fraction of peak DRAM bandwidth a streaming kernel reaches; every
  memory-bound op (norms, activations, residual adds, rotary, casts, the loss, the optimizer) runs at it.
- ``attention``: published FlashAttention / cuDNN speeds (TFLOP/s, head dim 128) against sequence length,
  forward with and without the causal mask and backward, as fractions of the measuring GPU's peak;
  read log-linearly between the published sequence lengths and clamped outside them. FLOPs follow the
  FlashAttention benchmarks (4·s²·heads·d per sequence forward, halved with the causal mask; backward
  2.5× forward). Where only a combined forward + backward speed is published (FlashAttention-2 and -1
  on A100, FlashAttention-1 on H100) forward and backward are both modelled at it. A causal backward is
  the published full-mask backward × the forward's causal/full ratio at that length (an assumption: the
  papers chart the backward without the mask).
- ``default_kernel``: which attention kernel each engine runs on this generation.
- collectives: the intra-node fabric's measured bus bandwidth (from the network catalog,
  :mod:`batchpilot.specs.network`, or a figure in the profile) and the message size at which a
  collective reaches half its large-message bandwidth (fitted to published sweeps).

Example::

    >>> from batchpilot.specs.hardware import load_accelerator
    >>> profile = profile_for(load_accelerator("h100-sxm"))
    >>> profile.name, profile.gemm_fraction("bf16"), profile.gemm_fraction("fp8")
    ('hopper', 0.803, 0.709)
    >>> round(profile.attention_curve("fa2")[1].forward_fraction(8192, causal=True), 3)   # 333 of 989.4
    0.337

A probe calibration (:mod:`batchpilot.estimate.calibration`) replaces the compute side of these figures
with a measurement on the user's device.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from batchpilot.errors import SpecError
from batchpilot.io import read_json_object
from batchpilot.specs.hardware import AcceleratorSpec, FigureSource
from batchpilot.units import unknown_name

ATTENTION_KERNELS: tuple[str, ...] = ("fa1", "fa2", "fa3", "cudnn", "fa4")
"""Flash-style attention kernels a profile can chart (FlashAttention 1-4, cuDNN fused attention)."""

ATTENTION_FALLBACK: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "fa4": ("fa4", "cudnn", "fa3", "fa2"), "cudnn": ("cudnn", "fa3", "fa2"), "fa3": ("fa3", "cudnn", "fa2"),
    "fa2": ("fa2", "cudnn"), "fa1": ("fa1", "fa2")})
"""The kernel used when a generation has no chart of the requested one (FlashAttention-3 needs Hopper,
cuDNN fused attention Hopper or newer): the first charted in this order."""

GENERIC_PROFILE = "generic"


@dataclass(frozen=True, kw_only=True, slots=True)
class AttentionCurve:
    """Published speed of one attention kernel on one generation, against sequence length."""

    reference_peak_flops_per_s: float
    """Dense bf16 peak of the GPU the points were measured on (the fractions' denominator)."""
    forward_causal: tuple[tuple[float, float], ...]
    """(sequence length, FLOP/s) of the forward with the causal mask."""
    forward_full: tuple[tuple[float, float], ...]
    """(sequence length, FLOP/s) of the forward without a mask."""
    backward_full: tuple[tuple[float, float], ...]
    """(sequence length, FLOP/s) of the backward without a mask."""
    source: FigureSource

    def _read(self, points: tuple[tuple[float, float], ...], seq: float) -> float:
        return _interpolate(points, seq) / self.reference_peak_flops_per_s

    def forward_fraction(self, seq: float, *, causal: bool) -> float:
        """Forward FLOP/s at ``seq`` ÷ the reference peak."""
        return self._read(self.forward_causal if causal else self.forward_full, seq)

    def backward_fraction(self, seq: float, *, causal: bool) -> float:
        """Backward FLOP/s at ``seq`` ÷ the reference peak (causal: × the forward's causal/full ratio)."""
        full = self._read(self.backward_full, seq)
        if not causal:
            return full
        return full * self._read(self.forward_causal, seq) / self._read(self.forward_full, seq)


def _interpolate(points: Sequence[tuple[float, float]], x: float) -> float:
    """Piecewise-linear in log(x) between the points, clamped outside them."""
    xs = [p[0] for p in points]
    i = bisect.bisect_left(xs, x)
    if i == 0:
        return points[0][1]
    if i == len(xs):
        return points[-1][1]
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    w = math.log(x / x0) / math.log(x1 / x0)
    return y0 + w * (y1 - y0)


@dataclass(frozen=True, kw_only=True, slots=True)
class KernelProfile:
    """What one GPU generation's kernels achieve (module docstring); loaded from a data file."""

    name: str
    display_name: str
    matches: tuple[str, ...]
    """Substrings of an accelerator's catalog or display name that select this profile."""
    gemm_efficiency: Mapping[str, float]
    """Best fraction of the dense peak a GEMM reaches, per dtype (``bf16``, ``fp8``)."""
    memory_efficiency: float
    """Fraction of peak DRAM bandwidth a streaming kernel reaches."""
    attention: Mapping[str, AttentionCurve]
    """Charted attention kernels by name (:data:`ATTENTION_KERNELS`)."""
    default_attention: Mapping[str, str]
    """Attention kernel per engine (``megatron``) and for every other engine (``other``)."""
    intra_node_network: str | None
    """Network catalog name of the node's GPU fabric (its measured busbw), or None."""
    intra_node_bus_efficiency: float | None
    """Measured ring busbw ÷ the accelerator's intra-node bandwidth, where no network entry has it."""
    intra_node_half_bytes: float
    """Message size at which an intra-node collective reaches half its large-message bus bandwidth."""
    inter_node_half_bytes: float
    """The same across nodes."""
    sources: Mapping[str, FigureSource] = field(default_factory=dict)
    """Source per figure (``gemm_efficiency.bf16``, ``memory_efficiency``, ...)."""

    def gemm_fraction(self, dtype: str) -> float:
        """GEMM efficiency at ``dtype`` (fp16 as bf16; a dtype the profile does not chart: bf16's)."""
        key = "bf16" if dtype == "fp16" else dtype
        return self.gemm_efficiency.get(key, self.gemm_efficiency["bf16"])

    def attention_curve(self, kernel: str) -> tuple[str, AttentionCurve]:
        """(kernel used, its curve): ``kernel`` if charted, else the first of :data:`ATTENTION_FALLBACK`."""
        if kernel not in ATTENTION_FALLBACK:
            raise SpecError(f"unknown attention kernel {kernel!r}; use one of {', '.join(ATTENTION_KERNELS)}")
        for name in (*ATTENTION_FALLBACK[kernel], *self.attention):
            if name in self.attention:
                return name, self.attention[name]
        raise SpecError(f"kernel profile {self.name} charts no attention kernel")  # the loader prevents this

    def default_attention_kernel(self, engine: str) -> str:
        return self.default_attention.get(engine, self.default_attention["other"])


# ---------------------------------------------------------------------- loading
def _figure(where: str, key: str, raw: Any, sources: dict[str, FigureSource], limits: tuple[float, float]) -> float:
    if not isinstance(raw, Mapping) or "value" not in raw or "source" not in raw:
        raise SpecError(f"{where}: {key} must be an object with value, source and says")
    value = raw["value"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not limits[0] <= value <= limits[1]:
        raise SpecError(f"{where}: {key} = {value!r} is outside [{limits[0]:g}, {limits[1]:g}]")
    sources[key] = FigureSource(url=str(raw["source"]), says=str(raw.get("says", "")))
    return float(value)


def _points(where: str, raw: Any) -> tuple[tuple[float, float], ...]:
    if not isinstance(raw, list) or len(raw) < 2:
        raise SpecError(f"{where}: a curve must be a list of at least two [sequence length, FLOP/s] pairs")
    points = tuple((float(x), float(y)) for x, y in raw)
    if any(b[0] <= a[0] for a, b in itertools.pairwise(points)) or any(y <= 0 for _, y in points):
        raise SpecError(f"{where}: sequence lengths must increase and speeds be positive")
    return points


def _curve(where: str, raw: Mapping[str, Any]) -> AttentionCurve:
    combined = {k: _points(f"{where}.{k}", raw[k]) for k in ("combined_causal", "combined_full") if k in raw}
    if combined:
        causal, full = combined["combined_causal"], combined["combined_full"]
        forward_causal, forward_full, backward_full = causal, full, full
    else:
        forward_causal = _points(f"{where}.forward_causal", raw.get("forward_causal"))
        forward_full = _points(f"{where}.forward_full", raw.get("forward_full"))
        backward_full = _points(f"{where}.backward_full", raw.get("backward_full"))
    return AttentionCurve(reference_peak_flops_per_s=float(raw["reference_peak_flops_per_s"]),
                          forward_causal=forward_causal, forward_full=forward_full, backward_full=backward_full,
                          source=FigureSource(url=str(raw["source"]), says=str(raw.get("says", ""))))


def profile_from_dict(data: Mapping[str, Any], *, name: str) -> KernelProfile:
    """Build a :class:`KernelProfile` from a parsed profile file; every problem is a one-line SpecError."""
    where = f"kernel profile {name}"
    sources: dict[str, FigureSource] = {}
    try:
        gemm = {dtype: _figure(where, f"gemm_efficiency.{dtype}", raw, sources, (0.01, 1.0))
                for dtype, raw in data["gemm_efficiency"].items()}
        attention_raw = data["attention"]
        curves = {k: _curve(f"{where}: attention.{k}", v) for k, v in attention_raw["kernels"].items()}
        half = data["collective_half_bytes"]
        bus = data.get("intra_node_bus_efficiency")
        profile = KernelProfile(
            name=name, display_name=str(data.get("display_name", name)), matches=tuple(data.get("matches", ())),
            gemm_efficiency=MappingProxyType(gemm),
            memory_efficiency=_figure(where, "memory_efficiency", data["memory_efficiency"], sources, (0.01, 1.0)),
            attention=MappingProxyType(curves), default_attention=MappingProxyType(dict(attention_raw["default_kernel"])),
            intra_node_network=data.get("intra_node_network"),
            intra_node_bus_efficiency=None if bus is None else _figure(where, "intra_node_bus_efficiency", bus,
                                                                       sources, (0.01, 2.0)),
            intra_node_half_bytes=_figure(where, "collective_half_bytes.intra_node", half["intra_node"], sources,
                                          (1.0, 2.0**40)),
            inter_node_half_bytes=_figure(where, "collective_half_bytes.inter_node", half["inter_node"], sources,
                                          (1.0, 2.0**40)),
            sources=MappingProxyType(sources),
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, SpecError):
            raise
        raise SpecError(f"{where}: malformed profile file ({type(exc).__name__}: {exc})") from None
    if "bf16" not in profile.gemm_efficiency or not profile.attention or "other" not in profile.default_attention:
        raise SpecError(f"{where}: needs gemm_efficiency.bf16, at least one attention kernel and default_kernel.other")
    if (profile.intra_node_network is None) == (profile.intra_node_bus_efficiency is None):
        raise SpecError(f"{where}: give exactly one of intra_node_network and intra_node_bus_efficiency")
    return profile


def _profile_dir() -> Path:
    return Path(str(resources.files("batchpilot") / "data" / "kernel_profiles"))


def profile_names() -> list[str]:
    """Names of the shipped kernel profiles, sorted."""
    return sorted(p.stem for p in _profile_dir().glob("*.json"))


@cache
def load_profile(name: str) -> KernelProfile:
    """A shipped kernel profile by name (``hopper``); unknown names are a one-line error listing the known."""
    names = profile_names()
    if name not in names:
        raise unknown_name("kernel profile", name, names)
    return profile_from_dict(read_json_object(_profile_dir() / f"{name}.json", "kernel profile file"), name=name)


def profile_for(accelerator: AcceleratorSpec) -> KernelProfile:
    """The profile with the longest of its ``matches`` in the accelerator's catalog or display name
    (case-insensitive; ``500 w`` beats ``h100`` for a power-limited H100); ``generic`` when none matches (step
    times then name that profile: no microbenchmark stands behind them)."""
    text = f"{accelerator.name} {accelerator.display_name}".lower()
    best, best_length = GENERIC_PROFILE, 0
    for name in profile_names():
        length = max((len(m) for m in load_profile(name).matches if m in text), default=0)
        if length > best_length:
            best, best_length = name, length
    return load_profile(best)
