"""Compute efficiency vs micro-batch size, and the calibration file the probe writes.

Efficiency is the fraction of the accelerator's dense peak that a training step's compute reaches
(executed FLOPs ÷ (peak × compute time)). Two sources:

- A :class:`Calibration` measured by ``batchpilot probe`` on the real device: efficiency at several
  tokens-per-micro-batch points (piecewise-linear in log tokens between them, clamped at both ends)
  and the memory overhead the analytic model missed. The step-time model
  (:mod:`batchpilot.estimate.steptime`) then takes the compute of a micro-batch as
  ``FLOPs / (peak FLOP/s × efficiency)`` and keeps its per-op split (:mod:`batchpilot.estimate.layer_time`)
  only as proportions. Without points (:data:`DEFAULT_CALIBRATION`) the step-time model times every op from
  the GPU generation's published microbenchmarks (:mod:`batchpilot.estimate.kernels`) instead.
- :func:`default_efficiency` (:class:`DefaultCurve`) — a one-formula efficiency for quick compute estimates
  that need no op inventory (the RL phases, :mod:`batchpilot.rl`); it depends on the shape of one GPU's
  GEMMs, not only on their FLOPs (:class:`MatmulShape`):

      e = e_max · M/(M + M_half) · w/(w + w_half),   M_half = 2·e_max·r,   w_half = ω·r

  with M = b·s the GEMM rows (tokens per micro-batch; tensor parallelism does **not** shrink them),
  w = h/t the per-GPU share of the hidden width (tensor parallelism splits a GEMM's N or K, not M), and
  r = dense peak ÷ DRAM bandwidth the accelerator's machine balance (FLOP/byte at the run's precision:
  153 for an A100 at bf16, 295 for an H100). Basis of each factor:

  * M: every weight element is read in bf16 forward and backward and its fp32 gradient read and
    written (≈ 12 bytes) against 6·M FLOPs, so weight traffic equals matmul time at
    M = 2·e_max·r tokens (roofline; short GEMMs — small micro-batches, MoE experts receiving few
    tokens — are weight-bandwidth bound). Derived, not fitted.
  * w: a layer's memory-bound work (norms, residual adds, dropout, bias and activation kernels,
    softmax) moves c bytes per token per unit of the hidden width h, and Megatron-style tensor
    parallelism replicates most of it on every rank, while the layer's matmul FLOPs per token on one
    GPU are 72·h·w for a GPT block (Narayanan et al. 2021 Eq. 3). The memory-bound time is then the
    matmul time at w = (c·e_max/72)·r = ω·r, i.e. narrow per-GPU widths (small models, large t) lose
    efficiency. ω is fitted.
  * e_max: the fraction of dense peak the large GEMMs, attention and fused kernels reach. Fitted.

  e_max = :data:`DEFAULT_MAX_EFFICIENCY` and ω = :data:`DEFAULT_WIDTH_HALF_PER_FLOPS_PER_BYTE` were
  fitted (least squares in log throughput) through the step-time model of commit 1336b38 on ONE source,
  Narayanan et al. 2021 Table 1 (GPT 1.7B–1T on 32–3072 A100s, 137–163 TFLOP/s per GPU): 4.6 % mean absolute
  error there, 16 % on MT-NLG 530B, BLOOM-176B and Llama 3 405B (``benchmarks/results/steptime_vs_published.md``
  at that commit). Known error: small models pay launch and memory-bound overheads the curve does not see.
  Calibrate with the probe.

File format (JSON, ``format_version`` 1)::

    {
      "format": "batchpilot-calibration",
      "format_version": 1,
      "accelerator": "h100-sxm",            # catalog name (or JSON file) the peak is from; "cpu" on CPU
      "model": "llama-3-8b",                # model name or config path (informational)
      "seq_len": 8192,                      # sequence length of the probe (informational)
      "memory_overhead_bytes": 2147483648,  # measured peak − analytic estimate (≥ 0), per GPU
      "points": [                           # ≥ 1 point, tokens strictly increasing
        {"tokens_per_micro_batch": 8192,  "efficiency": 0.41},
        {"tokens_per_micro_batch": 16384, "efficiency": 0.47}
      ],
      "source": "batchpilot probe 0.1.0, 2026-11-28T14:00:00Z"   # free text
    }

``efficiency`` is achieved training FLOP/s (model FLOPs plus recomputation, i.e. the FLOPs the device
actually executed, :func:`batchpilot.estimate.steptime.training_flops_per_token`) ÷ the accelerator's
dense peak at the run's precision, for one micro-batch's forward and backward without communication.
A calibration only calibrates the accelerator it was measured on: ``batchpilot plan`` refuses one whose
``accelerator`` is not its ``--gpu`` (:func:`check_calibration_accelerator`; a CPU probe records ``cpu``,
which no GPU plan accepts) and warns when the field is missing or empty.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchpilot.errors import SpecError
from batchpilot.io import path_is, read_json_object

CALIBRATION_FORMAT = "batchpilot-calibration"
CALIBRATION_FORMAT_VERSION = 1

DEFAULT_MAX_EFFICIENCY = 0.68
"""e_max: fraction of dense peak reached by large training GEMMs (fitted; see the module docstring)."""
DEFAULT_WIDTH_HALF_PER_FLOPS_PER_BYTE = 1.0
"""ω: the per-GPU width at which memory-bound work halves the efficiency, in units of the machine
balance r = peak ÷ DRAM bandwidth (fitted; see the module docstring)."""
WEIGHT_BYTES_PER_MATMUL_FLOP_TOKEN = 2.0
"""12 bytes of weight traffic per weight (bf16 read forward and backward, fp32 gradient read and
written) ÷ 6 FLOPs per weight and token: the M half-saturation is this × e_max × r tokens."""


@dataclass(frozen=True, kw_only=True, slots=True)
class MatmulShape:
    """What the default efficiency depends on: the GEMM shape one GPU runs and the machine balance."""

    tokens: float
    """M: GEMM rows per micro-batch on one GPU, b·s (tensor parallelism does not shrink it)."""
    width: float
    """w: per-GPU share of the hidden width, h/t (tensor parallelism splits N or K by t)."""
    flops_per_byte: float
    """r: dense peak FLOP/s at the run's precision ÷ DRAM bytes/s (153 for A100 bf16, 295 for H100)."""

    def __post_init__(self) -> None:
        for name in ("tokens", "width", "flops_per_byte"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise SpecError(f"matmul shape: {name} must be a positive finite number, got {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class DefaultCurve:
    """Constants of the default efficiency model (module docstring); the defaults are the fitted ones."""

    max_efficiency: float = DEFAULT_MAX_EFFICIENCY
    """e_max."""
    width_half_per_flops_per_byte: float = DEFAULT_WIDTH_HALF_PER_FLOPS_PER_BYTE
    """ω: w_half = ω·r."""

    def efficiency(self, shape: MatmulShape) -> float:
        """e_max · M/(M + 2·e_max·r) · w/(w + ω·r)."""
        r = shape.flops_per_byte
        tokens_half = WEIGHT_BYTES_PER_MATMUL_FLOP_TOKEN * self.max_efficiency * r
        width_half = self.width_half_per_flops_per_byte * r
        return (self.max_efficiency * shape.tokens / (shape.tokens + tokens_half)
                * shape.width / (shape.width + width_half))


@dataclass(frozen=True, kw_only=True, slots=True)
class EfficiencyPoint:
    """One measured point of the efficiency curve."""

    tokens_per_micro_batch: int
    """Tokens one forward/backward processes on one GPU (micro-batch sequences × sequence length)."""
    efficiency: float
    """Achieved FLOP/s ÷ dense peak FLOP/s, in (0, 1]."""

    def __post_init__(self) -> None:
        t = self.tokens_per_micro_batch
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise SpecError(f"calibration point: tokens_per_micro_batch must be a positive integer, got {t!r}")
        e = self.efficiency
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e) or not 0 < e <= 1:
            raise SpecError(f"calibration point at {t} tokens: efficiency must be in (0, 1], got {e!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class Calibration:
    """An efficiency curve and a memory overhead, measured (probe) or the documented default."""

    points: tuple[EfficiencyPoint, ...] = ()
    """Measured points, tokens strictly increasing; empty means :func:`default_efficiency`."""
    memory_overhead_bytes: int | None = None
    """Per-GPU bytes to add to the analytic memory estimate; None keeps the analytic model's default."""
    accelerator: str = ""
    """Catalog name of the accelerator the points were measured on ("" without a measurement)."""
    model: str = ""
    """Model the probe ran (informational)."""
    seq_len: int | None = None
    """Sequence length of the probe (informational)."""
    source: str = "per-op model (published kernel microbenchmarks)"
    """Where the numbers come from: probe version and time, or, without points, the step-time model's per-op
    model (:mod:`batchpilot.estimate.kernels`)."""
    default_curve: DefaultCurve = DefaultCurve()
    """The curve :meth:`efficiency_at` reads when ``points`` is empty (not part of the file; the step-time model
    uses its per-op model instead)."""

    def __post_init__(self) -> None:
        tokens = [p.tokens_per_micro_batch for p in self.points]
        if any(b <= a for a, b in itertools.pairwise(tokens)):
            raise SpecError(f"calibration points must have strictly increasing tokens_per_micro_batch, got {tokens}")
        o = self.memory_overhead_bytes
        if o is not None and (isinstance(o, bool) or not isinstance(o, int) or o < 0):
            raise SpecError(f"calibration memory_overhead_bytes must be a non-negative integer, got {o!r}")

    @property
    def is_default(self) -> bool:
        return not self.points

    def efficiency_at(self, shape: MatmulShape) -> float:
        """Efficiency of one GPU's GEMMs of ``shape``: the measured points read at M = ``shape.tokens``
        (the probe measures one GPU at t = 1, so its curve is a function of the GEMM rows), else the
        default model. Known error of a measured curve under tensor parallelism: it does not see the
        narrower per-GPU width (optimistic by the default model's width factor, a few % for h/t ≥ 2048)."""
        if self.points:
            return self.efficiency(shape.tokens)
        return self.default_curve.efficiency(shape)

    def efficiency(self, tokens_per_micro_batch: float) -> float:
        """Measured efficiency at this many tokens per micro-batch: points interpolated linearly in
        log(tokens) and clamped outside the measured range. The default model needs the whole GEMM shape:
        use :meth:`efficiency_at`."""
        if tokens_per_micro_batch <= 0:
            raise SpecError(f"tokens per micro-batch must be positive, got {tokens_per_micro_batch}")
        if not self.points:
            raise ValueError("the default efficiency depends on the GEMM shape; call efficiency_at(MatmulShape)")
        xs = [p.tokens_per_micro_batch for p in self.points]
        i = bisect.bisect_left(xs, tokens_per_micro_batch)
        if i == 0:
            return self.points[0].efficiency
        if i == len(xs):
            return self.points[-1].efficiency
        lo, hi = self.points[i - 1], self.points[i]
        w = math.log(tokens_per_micro_batch / lo.tokens_per_micro_batch) / math.log(
            hi.tokens_per_micro_batch / lo.tokens_per_micro_batch
        )
        return lo.efficiency + w * (hi.efficiency - lo.efficiency)

    def to_dict(self) -> dict[str, Any]:
        """The file's JSON object (see the module docstring)."""
        return {
            "format": CALIBRATION_FORMAT,
            "format_version": CALIBRATION_FORMAT_VERSION,
            "accelerator": self.accelerator,
            "model": self.model,
            "seq_len": self.seq_len,
            "memory_overhead_bytes": self.memory_overhead_bytes,
            "points": [
                {"tokens_per_micro_batch": p.tokens_per_micro_batch, "efficiency": p.efficiency}
                for p in self.points
            ],
            "source": self.source,
        }


DEFAULT_CALIBRATION = Calibration()
"""No measurement: the default efficiency curve and the analytic model's own overhead."""


def default_efficiency(shape: MatmulShape) -> float:
    """The default model with the fitted constants (module docstring: basis, fit and known error)."""
    return DefaultCurve().efficiency(shape)


def calibration_from_dict(data: Any, where: str = "calibration") -> Calibration:
    """Validate a parsed calibration object; every problem is a one-line :class:`SpecError`."""
    if not isinstance(data, dict):
        raise SpecError(f"{where}: a calibration must be a JSON object, got {type(data).__name__}")
    if data.get("format") != CALIBRATION_FORMAT:
        raise SpecError(f"{where}: field 'format' must be {CALIBRATION_FORMAT!r}, got {data.get('format')!r}")
    if data.get("format_version") != CALIBRATION_FORMAT_VERSION:
        raise SpecError(
            f"{where}: format_version {data.get('format_version')!r} is not supported; "
            f"this batchpilot reads version {CALIBRATION_FORMAT_VERSION}"
        )
    raw_points = data.get("points")
    if not isinstance(raw_points, list) or not raw_points:
        raise SpecError(f"{where}: field 'points' must be a non-empty list of {{tokens_per_micro_batch, efficiency}}")
    points = []
    for item in raw_points:
        if not isinstance(item, dict):
            raise SpecError(f"{where}: each point must be an object, got {item!r}")
        points.append(EfficiencyPoint(tokens_per_micro_batch=item.get("tokens_per_micro_batch"),  # type: ignore[arg-type]
                                      efficiency=item.get("efficiency")))  # type: ignore[arg-type]
    seq_len = data.get("seq_len")
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
        raise SpecError(f"{where}: field 'seq_len' must be a positive integer or null, got {seq_len!r}")
    return Calibration(
        points=tuple(points), memory_overhead_bytes=data.get("memory_overhead_bytes"),
        accelerator=str(data.get("accelerator", "")), model=str(data.get("model", "")),
        seq_len=seq_len, source=str(data.get("source", "")),
    )


def load_calibration(path: str | Path) -> Calibration:
    """Read a calibration file written by :func:`save_calibration` (or by hand, same format).

    Read through :func:`batchpilot.specs.model.read_json_object`: regular files of at most
    ``MAX_JSON_BYTES`` only (``/dev/zero`` or a FIFO is refused unread instead of hanging), UTF-8, one
    JSON object without NaN/Infinity; every failure is one line.
    """
    p = Path(path)
    try:
        data = read_json_object(p, "calibration file")
    except SpecError:
        if not path_is(p, "exists") and not path_is(p, "is_symlink"):
            raise SpecError(f"calibration file {str(p)!r} does not exist; run `batchpilot probe` to make one") from None
        raise
    return calibration_from_dict(data, where=f"calibration file {str(p)!r}")


CPU_ACCELERATOR = "cpu"
"""What a CPU probe without ``--gpu`` records: its efficiencies are fractions of this machine's
measured matmul rate (:func:`batchpilot.measure.probe.measure_cpu_matmul_flops`), no catalog figure."""


def check_calibration_accelerator(calibration: Calibration, accelerator: str, where: str = "calibration") -> str | None:
    """Refuse a calibration measured on another accelerator than ``accelerator`` (the plan's ``--gpu``).

    Efficiencies are fractions of the measuring device's dense peak and the memory overhead is that
    device's (CUDA context, allocator), so applying them to another accelerator is a wrong answer, not an
    approximation: a mismatch is a one-line :class:`SpecError` naming both and the fix. Names match
    case-insensitively, or when both name the same accelerator JSON file. A calibration recording no
    accelerator (hand-written; the probe always records one) cannot be checked: the returned one-line
    warning says so and the calibration is used. None when the names match.
    """
    recorded = calibration.accelerator.strip()
    if not recorded:
        return (f"{where} records no accelerator, so it is applied to {accelerator} unchecked; add "
                f'"accelerator": "{accelerator}" to it if it was measured on a {accelerator}')
    if _same_accelerator(recorded, accelerator):
        return None
    if recorded.lower() == CPU_ACCELERATOR:
        raise SpecError(
            f"{where} was measured on this machine's CPU (accelerator 'cpu': efficiencies relative to the CPU's "
            f"matmul rate) and cannot calibrate a plan for --gpu {accelerator}; probe on a {accelerator} with "
            f"`batchpilot probe --device cuda --gpu {accelerator} --calibration-out FILE`, or drop "
            f"--calibration for the default efficiency curve")
    raise SpecError(
        f"{where} was measured on {recorded}, not on --gpu {accelerator} (efficiencies are fractions of the "
        f"measuring device's peak); plan with --gpu {recorded}, or probe on a {accelerator} with "
        f"`batchpilot probe --device cuda --gpu {accelerator} --calibration-out FILE`")


def _same_accelerator(a: str, b: str) -> bool:
    """Same catalog name (case-insensitive) or the same accelerator JSON file."""
    if a.lower() == b.strip().lower():
        return True
    try:
        return Path(a).samefile(b.strip())
    except (OSError, ValueError):
        return False


def save_calibration(calibration: Calibration, path: str | Path) -> Path:
    """Write ``calibration`` as JSON (format version 1) and return the path."""
    if calibration.is_default:
        raise SpecError("refusing to save a calibration without measured points; add at least one point")
    p = Path(path)
    p.write_text(json.dumps(calibration.to_dict(), indent=2) + "\n", encoding="utf-8")
    return p
