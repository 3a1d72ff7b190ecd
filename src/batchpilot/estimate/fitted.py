"""The step-time model's constants fitted to training runs (everything else comes from microbenchmarks).

Two effects separate a training step from the sum of its kernels' microbenchmark speeds, and no published
microbenchmark measures them; they are fitted, by ``benchmarks/published_runs.py`` (``fit_constants``), on
the FIT split of ``benchmarks/data/published_runs.json`` only (a third of every source, chosen by a hash of
the row id before any fitting), minimising Σ log²(predicted / published tokens/s per GPU). The benchmark
refits them on every run and fails when the shipped values differ from the refit.

- ``sustained_fraction``: tensor-core throughput sustained through a training step ÷ the best-shape
  microbenchmark (``gemm_efficiency`` and the attention curves of :mod:`batchpilot.estimate.kernels`).
  GEMM sweeps measure the best shape over a few hundred milliseconds at boost clock; a training step runs
  the model's shapes for seconds under the board's power limit.
- ``overlap_interference``: the fraction of communication hidden behind compute that still costs time —
  NCCL kernels take SMs and DRAM bandwidth from the compute they overlap, and prefetching is imperfect.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True, slots=True)
class FittedConstants:
    """Constants fitted on the published runs' fit split (module docstring)."""

    sustained_fraction: float = 1.0
    """Sustained ÷ microbenchmark tensor-core throughput (GEMMs and attention)."""
    overlap_interference: float = 0.0
    """Seconds added per second of communication hidden behind compute."""

    def __post_init__(self) -> None:
        if not 0.1 <= self.sustained_fraction <= 1.5 or not 0.0 <= self.overlap_interference <= 2.0:
            raise ValueError(f"fitted constants out of range: {self}")


FITTED = FittedConstants(sustained_fraction=0.8, overlap_interference=0.6)
"""The shipped constants (see the module docstring for the fit and ``benchmarks/results/published_runs.md``)."""
