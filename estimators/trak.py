"""`trak`: TRAK (Park et al. 2023) for one model: influence with the damped empirical Fisher of
randomly projected per-example gradients.

    P (d, k): Gaussian with entries N(0, 1/k) (`projection="gaussian"`, the paper's), or the Q of a
              QR factorisation of a Gaussian (d, k), k ≤ d, with orthonormal columns
              (`projection="orthogonal"`)
    Φ = ∇ℓ P (N, k), φ_q = Pᵀ∇ℓ_q, φₘ = Pᵀ∇ℓₘ
    S[q, m] = ε φ_qᵀ (ΦᵀΦ/N + μI)⁻¹ φₘ,   μ = wd + λ,   (n_query, n_removed)

The curvature is the empirical Fisher F = (1/N) Σᵢ ∇ℓᵢ∇ℓᵢᵀ seen through P, not the Gauss–Newton G
of the benchmark's linearized PBRF: the two agree only where the loss has the GN = Fisher
property in expectation (targets drawn from the model's own predictive distribution), which a
trained model's labels are not. So `uses_curvature = False`: the conformance checks require its
scores to rank like the Gauss–Newton influence, not to equal it (on their least-squares problem
F ≈ σ²G with σ² the residual variance). For a square orthogonal P (k = d) the scores are exactly
ε ∇ℓ_qᵀ (F + μI)⁻¹ ∇ℓₘ (tests/test_new_estimators.py).
Measured on the mlp-mnist `cpu` problem (mean per-query Pearson with `exact`, 40 removed examples):
0.64 at k = 2048 and 0.65 at k = 8192: the gap is the empirical Fisher's, not the projection's.
Left out of the paper's estimator: the ensemble over independently trained models, the
reweighting by 1 − pᵢ of the output probability, and the sparsification of the scores.

Defaults and their sources:
- projection_dim 2048: the `proj_dim` default of the authors' `trak` library (TRAKer).
- projection "gaussian": the paper's dense Gaussian projection (the library's default on CPU).
- damping None → the problem's λ (estimators/base.py), so that μ = wd + λ as for every estimator;
  TRAK itself inverts ΦᵀΦ undamped.
- seed 0, added to problem.seed for P.
Memory: P (d, k) and Φ (N, k); per-example gradients are computed `problem.chunk_size` examples at
a time and projected, never all N × d at once.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from benchmark.linalg import CholeskySolver
from benchmark.problem import Batch, Problem

from .base import Estimator, effective_damping

PROJECTIONS = ("gaussian", "orthogonal")


class TRAK(Estimator):
    description = "TRAK: damped empirical Fisher of randomly projected gradients (one model)"
    uses_curvature = False  # the empirical Fisher, not the Gauss-Newton G (see the module docstring)

    def __init__(self, damping: float | None = None, projection_dim: int = 2048, projection: str = "gaussian",
                 seed: int = 0):
        self.damping = damping
        self.projection_dim = projection_dim
        self.projection = projection
        self.seed = seed

    def _projection(self, problem: Problem) -> Tensor:
        d, k = problem.n_params, int(self.projection_dim)
        if self.projection not in PROJECTIONS:
            raise ValueError(f"trak: projection must be one of {PROJECTIONS}, got {self.projection!r}")
        if k < 1 or (self.projection == "orthogonal" and k > d):
            raise ValueError(f"trak: projection_dim {k} must be in 1..{d} (d) for an orthogonal projection"
                             if self.projection == "orthogonal" else f"trak: projection_dim must be ≥ 1, got {k}")
        g = torch.Generator().manual_seed(problem.seed + self.seed)
        P = torch.randn(d, k, dtype=problem.dtype, generator=g).to(problem.device)
        if self.projection == "orthogonal":
            return torch.linalg.qr(P).Q  # (d, k), orthonormal columns
        return P / math.sqrt(k)

    def project(self, batch: Batch) -> Tensor:
        """Pᵀ∇ℓᵢ for every example of `batch` -> (n, k), `problem.chunk_size` examples at a time."""
        return torch.cat([G @ self.projection_ for G in self.problem.gradient_chunks(batch)])

    def fit(self, problem: Problem) -> "TRAK":
        self.problem_ = problem
        self.mu_ = effective_damping(problem, self.damping)
        self.projection_ = self._projection(problem)  # (d, k)
        self.features_ = self.project(problem.train)  # Φ (N, k)
        k = self.features_.shape[1]
        A = self.features_.T @ self.features_ / problem.n_train
        self.solver_ = CholeskySolver(A + self.mu_ * torch.eye(k, dtype=A.dtype, device=A.device))
        return self

    def scores(self, train_idx: Tensor, query: Batch) -> Tensor:
        p = self.problem
        X = self.solver_.solve(self.features_[train_idx])  # (ΦᵀΦ/N + μI)⁻¹ φₘ, (n_removed, k)
        return p.epsilon * self.project(query) @ X.T
