"""`exact`: the linearized PBRF itself, Δθ₋ₘ = ε (G + (wd+λ)I)⁻¹ ∇ℓₘ(θˢ).

A dense Cholesky solve when d ≤ dense_max_params, float64 CG to a relative residual of 1e-10
otherwise (the result records which through `solver_`).
"""
from __future__ import annotations

from torch import Tensor

from benchmark.problem import Problem
from benchmark.responses import DampedGaussNewton, SolverSettings

from .base import ParameterEstimator, effective_damping


class Exact(ParameterEstimator):
    description = "exact damped Gauss-Newton influence (dense solve, float64 CG for large d)"

    def __init__(self, damping: float | None = None, dense_max_params: int = 16384, rtol: float = 1e-10):
        self.damping = damping
        self.dense_max_params = dense_max_params
        self.rtol = rtol

    def fit(self, problem: Problem) -> "Exact":
        settings = SolverSettings(dense_max_params=self.dense_max_params, linear_rtol=self.rtol)
        self.curvature_ = DampedGaussNewton(problem, effective_damping(problem, self.damping), settings)
        self.solver_ = self.curvature_.method
        self.problem_ = problem
        return self

    def parameter_change(self, train_idx: Tensor) -> Tensor:
        B = self.problem.epsilon * self.problem.train_gradients(train_idx)
        return self.curvature_.solve(B)[0]
