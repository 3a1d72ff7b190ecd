"""Provenance of hardware figures, shared by the accelerator and network catalogs: where each figure comes
from (:class:`FigureSource`), and the plausibility limit on device counts.

    >>> FigureSource(url="https://www.nvidia.com/en-us/data-center/h100/", says="GPU Memory 80GB").to_dict()["says"]
    'GPU Memory 80GB'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_DEVICES = 2**20
"""Most GPUs in a job (and per cluster dimension): several times the largest clusters announced (~2·10^5 GPUs)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class FigureSource:
    """Where one hardware figure comes from."""

    url: str
    """The vendor document (datasheet, whitepaper) the figure is taken from."""
    says: str
    """What that document states, verbatim or nearly (e.g. "BFLOAT16 Tensor Core 1,979 teraFLOPS*")."""
    dense: bool | None = None
    """For FLOP/s figures: True when the stored value is the dense (non-sparse) rate."""
    verified_via: str = ""
    """An independent copy of the figure that was checked (URL + what it shows), if any."""

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "says": self.says, "dense": self.dense, "verified_via": self.verified_via}
