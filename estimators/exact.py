"""`exact`: the linearized PBRF itself, Δθ₋ₘ = ε (G + (wd+λ)I)⁻¹ ∇ℓₘ(θˢ).

Solved to a relative residual of rtol = 1e-10 per removed example, measured with float64
products (the result records the path through `solver_`; benchmark.responses.DampedGaussNewton):

- where d ≤ dense_max_params and forming the dense G costs at most dense_max_flops (N·C·d² for C
  outputs): G and the Cholesky factor of G + μI in float32 (`inner_dtype`), preconditioning
  float64 CG, which then needs a few iterations ("pcg (float32 factor)"); or, where G's N·C rows
  are fewer than d/2, a Woodbury solve on the N·C × N·C kernel ("kernel", float64);
- otherwise CG on float32 products inside iterative refinement of the float64 residual
  ("refined cg (float32)").

inner_dtype=None keeps everything in float64: the Cholesky factor itself ("dense") and plain
float64 CG ("cg"); both agree with the float32 paths to the tolerance (tests/test_ridge.py,
tests/test_estimators_agree.py; κ·rtol apart at most). The flop bound (1e12) picks the cheaper:
measured at `cpu`, one thread, the other core busy, the autoencoder (C = 196, d = 14,124:
N·C·d² = 3.9e13) took 979 s dense and 616 s by CG to 1e-10 for the same Pearson 0.973; mlp-mnist
(1.69e12) 89.8 s and 3.9 GB dense against 22.6 s and 64 MB by CG, mlp-fashion (the same size)
85.8 s against 27.1 s, Pearson equal to 2e-12 and 1.5e-11. At `cpu` mlp-energy takes the kernel
path, the LR tasks, mlp-concrete and the CNNs the float32 factor, the image MLPs, the
autoencoder and the Transformer refinement.

Float32 inner work, measured one thread on an idle machine at `cpu` (40 removed examples):
resnet20-mnist (d = 9,811) G 21 → 13 s (from the kept float64 Jacobians, 11–17 s either way), its
Cholesky factor 13.8 → 7.8 s, then 4 float64 CG iterations (2.7 s) to 9e-11; mlp-mnist 163
iterations of float64 CG (19.9 s) against 3 refinement steps of 307 float32 iterations (14.3 s);
ae-mnist 364 (about 156 s) against 3 steps of 639 (87.4 s).
"""
from __future__ import annotations

from torch import Tensor

from benchmark.problem import Problem
from benchmark.responses import DampedGaussNewton, SolverSettings

from .base import ParameterEstimator, dense_gauss_newton_flops, dtype_option, effective_damping


class Exact(ParameterEstimator):
    description = ("exact damped Gauss-Newton influence (float32 inner work, float64 residual to 1e-10: "
                   "dense-preconditioned or refined CG)")

    def __init__(self, damping: float | None = None, dense_max_params: int = 16384, dense_max_flops: float = 1e12,
                 rtol: float = 1e-10, inner_dtype: str | None = "float32"):
        self.damping = damping
        self.dense_max_params = dense_max_params
        self.dense_max_flops = dense_max_flops
        self.rtol = rtol
        self.inner_dtype = inner_dtype

    def fit(self, problem: Problem) -> "Exact":
        max_params = self.dense_max_params if dense_gauss_newton_flops(problem) <= self.dense_max_flops else 0
        settings = SolverSettings(dense_max_params=max_params, linear_rtol=self.rtol)
        inner = dtype_option(self.inner_dtype, "exact", "inner_dtype", problem.dtype)
        self.curvature_ = DampedGaussNewton(problem, effective_damping(problem, self.damping), settings, inner)
        self.solver_ = self.curvature_.method
        self.problem_ = problem
        return self

    def parameter_change(self, train_idx: Tensor) -> Tensor:
        B = self.problem.epsilon * self.problem.train_gradients(train_idx)
        return self.curvature_.solve(B)[0]
