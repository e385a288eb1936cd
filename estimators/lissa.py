"""`lissa`: LiSSA (Agarwal et al. 2017) with the Gauss–Newton Hessian, as in Koh & Liang.

Solves (G + μI) x = b, b = ε ∇ℓₘ, μ = wd + λ, by the truncated Neumann recursion
    h₀ = b,  h_j = b + (I − (G_Bj + μI)/s) h_{j−1},  x ≈ h_J / s,
with G_Bj the Gauss–Newton matrix of a fresh minibatch Bj at every step (shared by all
removed examples), averaged over `repeats` independent recursions. Truncation at depth J acts
like extra damping of about s/J (Vicol et al. 2022).

Defaults: depth 1000, batch 128, 1 repeat, scale s = 2 (λ_max(G) + μ) with λ_max from 20
power iterations on the full-batch G in `fit` (the recursion needs s > λ_max(G_B) + μ).
"""
from __future__ import annotations

import torch
from torch import Tensor

from benchmark.problem import Problem

from .base import ParameterEstimator, effective_damping


def top_eigenvalue(matvec, d: int, dtype, device, iterations: int, generator: torch.Generator) -> float:
    """Largest eigenvalue of a PSD operator by power iteration from a seeded random start."""
    v = torch.randn(1, d, dtype=dtype, generator=generator).to(device)
    v = v / v.norm()
    value = 0.0
    for _ in range(iterations):
        w = matvec(v)
        value = float((w * v).sum())
        v = w / w.norm().clamp_min(torch.finfo(dtype).tiny)
    return value


class LiSSA(ParameterEstimator):
    description = "LiSSA with minibatch Gauss-Newton products"

    def __init__(self, damping: float | None = None, depth: int = 1000, scale: float | None = None,
                 batch_size: int = 128, repeats: int = 1, seed: int = 0):
        self.damping = damping
        self.depth = depth
        self.scale = scale
        self.batch_size = batch_size
        self.repeats = repeats
        self.seed = seed

    def fit(self, problem: Problem) -> "LiSSA":
        self.mu_ = effective_damping(problem, self.damping)
        self.problem_ = problem
        if self.scale is None:
            g = torch.Generator().manual_seed(problem.seed + self.seed)
            lam = top_eigenvalue(problem.gnvp, problem.n_params, problem.dtype, problem.device, 20, g)
            self.scale_ = 2.0 * (lam + self.mu_)
        else:
            self.scale_ = float(self.scale)
        return self

    def parameter_change(self, train_idx: Tensor) -> Tensor:
        p = self.problem
        b = p.epsilon * p.train_gradients(train_idx)
        g = torch.Generator().manual_seed(p.seed + self.seed + 1)
        n, s = p.n_train, self.scale_
        total = torch.zeros_like(b)
        for _ in range(self.repeats):
            h = b.clone()
            for _ in range(self.depth):
                batch = p.train.subset(torch.randperm(n, generator=g)[:self.batch_size].to(p.device))
                h = b + h - (p.gnvp(h, batch=batch) + self.mu_ * h) / s
            if not torch.isfinite(h).all():
                raise FloatingPointError(f"LiSSA diverged: scale {s:.3g} is below the largest eigenvalue of "
                                         "the minibatch Gauss-Newton matrix; pass a larger `scale`")
            total += h / s
        return total / self.repeats
