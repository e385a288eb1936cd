"""`cg`: truncated conjugate gradients on (G + (wd+λ)I) x = ε ∇ℓₘ, batched over removed examples.

Defaults: at most 100 iterations or a relative residual of 1e-6, whichever comes first.
"""
from __future__ import annotations

from torch import Tensor

from benchmark.linalg import batched_cg
from benchmark.problem import Problem

from .base import ParameterEstimator, effective_damping


class CG(ParameterEstimator):
    description = "truncated conjugate gradients on the damped Gauss-Newton system"

    def __init__(self, damping: float | None = None, maxiter: int = 100, rtol: float = 1e-6):
        self.damping = damping
        self.maxiter = maxiter
        self.rtol = rtol

    def fit(self, problem: Problem) -> "CG":
        self.mu_ = effective_damping(problem, self.damping)
        self.problem_ = problem
        return self

    def parameter_change(self, train_idx: Tensor) -> Tensor:
        p = self.problem
        B = p.epsilon * p.train_gradients(train_idx)
        X, self.info_ = batched_cg(lambda V: p.gnvp(V) + self.mu_ * V, B, rtol=self.rtol, maxiter=self.maxiter)
        return X
