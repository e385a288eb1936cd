"""`exact`: the linearized PBRF itself, Δθ₋ₘ = ε (G + (wd+λ)I)⁻¹ ∇ℓₘ(θˢ).

A direct solve when d ≤ dense_max_params and forming the dense G costs at most
dense_max_flops (N·C·d² for C outputs): the Cholesky factor of G + μI, or a Woodbury solve on
the N·C × N·C kernel where that is cheaper (N·C below d: benchmark.linalg.KernelSolver);
float64 CG to a relative residual of 1e-10 otherwise (the result records which through `solver_`).
Both are exact to the tolerance; the flop bound (1e12) picks the cheaper. Measured at `cpu`, one
thread, the other core busy: the autoencoder (C = 196, d = 14,124: N·C·d² = 3.9e13) took 979 s
dense and 616 s by CG to 1e-10 for the same Pearson 0.973; mlp-mnist (1.69e12) 89.8 s and 3.9 GB
dense against 22.6 s and 64 MB by CG, mlp-fashion (the same size) 85.8 s against 27.1 s, Pearson
equal to 2e-12 and 1.5e-11. What stays dense at `cpu`: the LR tasks and the UCI MLPs (d = 433).
"""
from __future__ import annotations

from torch import Tensor

from benchmark.problem import Problem
from benchmark.responses import DampedGaussNewton, SolverSettings

from .base import ParameterEstimator, dense_gauss_newton_flops, effective_damping


class Exact(ParameterEstimator):
    description = "exact damped Gauss-Newton influence (dense solve, float64 CG for large d)"

    def __init__(self, damping: float | None = None, dense_max_params: int = 16384, dense_max_flops: float = 1e12,
                 rtol: float = 1e-10):
        self.damping = damping
        self.dense_max_params = dense_max_params
        self.dense_max_flops = dense_max_flops
        self.rtol = rtol

    def fit(self, problem: Problem) -> "Exact":
        max_params = self.dense_max_params if dense_gauss_newton_flops(problem) <= self.dense_max_flops else 0
        settings = SolverSettings(dense_max_params=max_params, linear_rtol=self.rtol)
        self.curvature_ = DampedGaussNewton(problem, effective_damping(problem, self.damping), settings)
        self.solver_ = self.curvature_.method
        self.problem_ = problem
        return self

    def parameter_change(self, train_idx: Tensor) -> Tensor:
        B = self.problem.epsilon * self.problem.train_gradients(train_idx)
        return self.curvature_.solve(B)[0]
