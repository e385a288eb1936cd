"""`cg`: truncated conjugate gradients on (G + (wd+λ)I) x = ε ∇ℓₘ, batched over removed examples.

Defaults: at most 100 iterations or a relative residual of 1e-6, whichever comes first.

Rows solved together are independent in exact arithmetic, but not bitwise: the batched
Gauss–Newton product rounds differently for different sets of rows (BLAS kernels depend on the
shapes and the CPU), and CG's unconverged iterates amplify that rounding. Measured on the
conformance problem (estimators.checks.mlp_problem, d = 51, wd + λ = 0.02, κ ≈ 64): relative
noise of 1e-15 in every product moves the scores by up to 2.1e-6 of max |S| at rtol = 1e-6
(200 seeded trials; 5.6e-5 after a fixed 20 iterations, 1e-14 after 60), against an error of
2.7e-6 of the rtol = 1e-6 solution itself. So a row's result is defined only to about κ · rtol,
which `batch_rtol` states (100 · rtol), and the checks allow. On the ill-conditioned `cpu`
CNNs, whose rows stop at the 100-iteration cap, the same holds at full size: products summed
in another order (equal to 3e-16, commit 204cce2) moved the `cg` scores by 1.6e-2 (relative)
and Pearson by 2.3e-3 on resnet20-mnist, 8.9e-4 on vgg13-mnist, 1.5e-4 on vgg13-cifar, well
inside their bootstrap intervals (± 0.06–0.14).
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

    @property
    def batch_rtol(self) -> float:
        """A row's scores are defined to about κ · rtol (see the module docstring)."""
        return 100.0 * self.rtol

    def fit(self, problem: Problem) -> "CG":
        self.mu_ = effective_damping(problem, self.damping)
        self.problem_ = problem
        return self

    def parameter_change(self, train_idx: Tensor) -> Tensor:
        p = self.problem
        B = p.epsilon * p.train_gradients(train_idx)
        X, self.info_ = batched_cg(lambda V: p.gnvp(V) + self.mu_ * V, B, rtol=self.rtol, maxiter=self.maxiter)
        return X
