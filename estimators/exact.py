"""`exact`: the linearized PBRF itself, Δθ₋ₘ = ε (G + (wd+λ)I)⁻¹ ∇ℓₘ(θˢ).

Solved to a relative residual of rtol = 1e-10 per removed example, measured with float64
products (the result records the path through `solver_`; benchmark.responses.DampedGaussNewton):

- where d ≤ dense_max_params and forming the dense G costs at most dense_max_flops (N·C·d² for C
  outputs): G and the Cholesky factor of G + μI in float32 (`inner_dtype`), preconditioning
  float64 CG, which then needs a few iterations ("pcg (float32 factor)"); or, where G's N·C rows
  are fewer than d/2, a Woodbury solve on the N·C × N·C kernel ("kernel", float64);
- otherwise float64 CG preconditioned by a rank-ℓ randomized Nyström approximation of G built
  from ℓ = `nystrom_rank` = 400 products in float32 ("pcg (rank-400 Nyström, float32 products)";
  benchmark.linalg.NystromPreconditioner): the ℓ largest eigenvalues, which set CG's pace, are
  taken out.

inner_dtype=None factorises in float64 ("dense"), nystrom_rank=0 runs plain CG ("cg"); every path
agrees with the others to the tolerance (tests/test_ridge.py, tests/test_estimators_agree.py;
κ·rtol apart at most). The flop bound (1e12) picks the cheaper: measured at `cpu`, one thread,
the other core busy, the autoencoder (C = 196, d = 14,124: N·C·d² = 3.9e13) took 979 s dense and
616 s by plain CG to 1e-10 for the same Pearson 0.973; mlp-mnist (1.69e12) 89.8 s and 3.9 GB
dense against 22.6 s and 64 MB by CG, mlp-fashion (the same size) 85.8 s against 27.1 s, Pearson
equal to 2e-12 and 1.5e-11. At `cpu` mlp-energy takes the kernel path, the LR tasks,
mlp-concrete and the CNNs the float32 factor, the image MLPs, the autoencoder and the
Transformer the Nyström one.

Measured one thread on an idle machine at `cpu` (40 removed examples, 25 on the Transformer):
resnet20-mnist (d = 9,811) G 21 → 13 s in float32 (from the kept float64 Jacobians, 11–17 s
either way), its Cholesky factor 13.8 → 7.8 s, then 4 float64 CG iterations (2.7 s) to 9e-11.
Plain CG against Nyström-preconditioned CG (DampedGaussNewton.solve to 1e-10 with nystrom_rank 0
and RANK, float32 products): mlp-mnist 163
iterations (19.9 s) against 28 at rank 300 (4.2 s + 0.9 s to build); ae-mnist 364 (about 156 s)
against 74 at rank 300 (32.4 + 2.0 s) and 48 at 600 (21.2 + 4.3 s); transformer-ptb 57 against
11 at 300 (20.8 + 9.3 s) and 8 at 600 (16.5 + 20.0 s): 400 sits between the two.
"""
from __future__ import annotations

from torch import Tensor

from benchmark.problem import Problem
from benchmark.responses import DampedGaussNewton, SolverSettings

from .base import ParameterEstimator, dense_gauss_newton_flops, dtype_option, effective_damping


class Exact(ParameterEstimator):
    description = ("exact damped Gauss-Newton influence (float64 CG to 1e-10, preconditioned by a float32 "
                   "dense factor or a rank-400 Nystrom approximation)")

    def __init__(self, damping: float | None = None, dense_max_params: int = 16384, dense_max_flops: float = 1e12,
                 rtol: float = 1e-10, inner_dtype: str | None = "float32", nystrom_rank: int = 400):
        self.damping = damping
        self.dense_max_params = dense_max_params
        self.dense_max_flops = dense_max_flops
        self.rtol = rtol
        self.inner_dtype = inner_dtype
        self.nystrom_rank = nystrom_rank

    def fit(self, problem: Problem) -> "Exact":
        max_params = self.dense_max_params if dense_gauss_newton_flops(problem) <= self.dense_max_flops else 0
        settings = SolverSettings(dense_max_params=max_params, linear_rtol=self.rtol,
                                  nystrom_rank=int(self.nystrom_rank))
        inner = dtype_option(self.inner_dtype, "exact", "inner_dtype", problem.dtype)
        self.curvature_ = DampedGaussNewton(problem, effective_damping(problem, self.damping), settings, inner)
        self.solver_ = self.curvature_.method
        self.problem_ = problem
        return self

    def parameter_change(self, train_idx: Tensor) -> Tensor:
        B = self.problem.epsilon * self.problem.train_gradients(train_idx)
        return self.curvature_.solve(B)[0]
