"""Synthetic linear regression whose gradient mean and covariance are known in closed form.

Model y = xᵀw* + ε with x ~ N(0, I_d), ε ~ N(0, σ²); per-example loss ℓ = ½(xᵀw − y)². At parameters
w = w* + δ the per-example gradient is g = x(xᵀδ − ε), so (Isserlis' theorem for Gaussian x):

    G = E[g] = δ                         → |G|² = |δ|²
    E[g gᵀ] = |δ|²·I + 2·δδᵀ + σ²·I      → Σ = |δ|²·I + δδᵀ + σ²·I
    tr Σ = (d + 1)·|δ|² + d·σ²           → B_simple = d + 1 + d·σ²/|δ|²

An independent derivation (not taken from the code under test).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True, slots=True)
class LinReg:
    """The synthetic problem."""

    dim: int
    """d, number of features."""
    noise_var: float
    """σ², label-noise variance."""
    delta_sq: float
    """|δ|² = |w − w*|², distance of the measured parameters from the optimum."""

    @property
    def b_simple(self) -> float:
        """Closed-form B_simple = tr Σ / |G|²."""
        return self.dim + 1 + self.dim * self.noise_var / self.delta_sq

    def make(self, seed: int) -> tuple[torch.nn.Linear, torch.Tensor]:
        """(model at w = w* + δ, w*) with w* random and δ of squared norm ``delta_sq``."""
        gen = torch.Generator().manual_seed(seed)
        w_star = torch.randn(self.dim, generator=gen, dtype=torch.float64)
        delta = torch.randn(self.dim, generator=gen, dtype=torch.float64)
        delta *= (self.delta_sq / delta.square().sum()).sqrt()
        model = torch.nn.Linear(self.dim, 1, bias=False).double()
        with torch.no_grad():
            model.weight.copy_((w_star + delta).unsqueeze(0))
        return model, w_star

    def batch(self, w_star: torch.Tensor, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) for ``size`` fresh examples."""
        x = torch.randn(size, self.dim, generator=gen, dtype=torch.float64)
        eps = torch.randn(size, generator=gen, dtype=torch.float64) * self.noise_var**0.5
        return x, x @ w_star + eps


def loss_sum(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ over examples of ½(xᵀw − y)²."""
    return 0.5 * (model(x).squeeze(-1) - y).square().sum()
