"""`pydvl-cg`, `pydvl-lissa`, `pydvl-arnoldi`, `pydvl-nystroem`, `pydvl-ekfac`: the inverse-curvature
solvers of pyDVL's influence module (pydvl.influence.torch, 0.10; `pip install -e ".[peers]"`).

Conventions, pyDVL's and how they become ours (Δθ₋ₘ = ε (G + μI)⁻¹ ∇ℓₘ, μ = wd + λ, S = ∇ℓ_qᵀ Δθ):

- Scores. pyDVL's `influences(x_test, y_test, x, y, mode=InfluenceMode.Up)` is ⟨H⁻¹∇ℓ_test, ∇ℓ⟩ with
  H the Hessian of the MEAN loss over the fit data plus `regularization`·I: no ε (our 1/N), and the
  sign of ours (versions before 0.10 returned its negative). The adapters use the solve itself,
  x = (H + reg·I)⁻¹ b, and set Δθ₋ₘ = ε x for b = ∇ℓₘ (ParameterEstimator scores it).
- Curvature. pyDVL's operators are the Hessian (`SecondOrderMode.HESSIAN`) or what it calls the
  Gauss–Newton matrix, which is the EMPIRICAL Fisher (1/n) Σ ∇ℓᵢ ∇ℓᵢᵀ (`GAUSS_NEWTON`); neither is the
  generalized Gauss–Newton G of the benchmark. The CG / LiSSA / Arnoldi / Nyström adapters therefore
  hand pyDVL the Hessian of a surrogate loss whose Hessian at θˢ IS G: per example
  ½ ‖Rᵢᵀ (f(θ, xᵢ) − f(θˢ, xᵢ))‖² with H_y,ᵢ = Rᵢ Rᵢᵀ (benchmark.problem.psd_sqrt), whose gradient at θˢ
  is 0 and Hessian Jᵢᵀ H_y,ᵢ Jᵢ. Its gradients are zero, so the right-hand sides b = ∇ℓₘ come from
  `problem.train_gradients` and go to the block's operator (`op.apply`) directly.
- Damping. `regularization` (CG, LiSSA, Arnoldi, Nyström) and `hessian_regularization` (EK-FAC) are
  added to the curvature: set to μ = wd + λ (the model loss has no weight decay).
- EK-FAC. `EkfacInfluence` has its own curvature: cross-entropy only, nn.Linear layers only, with
  K-FAC factors from one pseudo-gradient per example, the output gradient of Σ_k √p_k log p_k (√p
  detached), g = √p − p Σ_k √p_k. Its outer product g gᵀ is NOT the output Hessian diag(p) − p pᵀ
  (it lacks the cross terms of the Fisher's expectation; for two classes it is the Hessian times
  (√p₁ − √p₂)²), so pyDVL's EK-FAC approximates a different matrix from G; the adapter keeps it
  as pyDVL computes it (the README's table measures it against our ekfac). Its right-hand sides
  are pyDVL's own `influence_factors(x, y)` (per-example gradients of F.cross_entropy, checked
  equal to the task's loss at fit time). With update_diagonal (default) the eigenvalues are
  refitted (EK-FAC proper), else they are K-FAC's.
- float64. pyDVL's EK-FAC allocates its factors with torch's default dtype (float32) and fails
  on a float64 model ("expected m1 and m2 to have the same dtype"); the adapter runs its fit and
  solves with torch's default dtype set to the model's and restores it after. The other solvers
  work in the model's dtype.

Evaluations: the right-hand sides (`problem.train_gradients`) and the outputs of the fit are
counted by the problem; pyDVL's own curvature products go through its operators, which expose no
count, and are NOT in `problem.counter` (the EK-FAC fit's forwards and backwards are added to it).
LiSSA draws its minibatches from torch's global generator: the adapter seeds a forked generator
with problem.seed, so its scores are reproducible and the global state is left as it was.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from benchmark.problem import Problem, output_hessians, psd_sqrt

from ..base import ParameterEstimator, effective_damping
from ._common import require


def _surrogate_loss(outputs: Tensor, packed: Tensor) -> Tensor:
    """mean over the batch of ½ ‖Rᵀ (f − fˢ)‖², packed (n, C, 1 + C) = [fˢ | R]: Hessian G at θˢ."""
    f_base, R = packed[..., 0], packed[..., 1:]
    z = torch.einsum("ncd,nc->nd", R, outputs - f_base)
    return 0.5 * z.pow(2).sum(-1).mean()


@contextmanager
def _default_dtype(dtype: torch.dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


class _PyDVLSolver(ParameterEstimator):
    """A pyDVL composable influence model on the surrogate whose Hessian is G; subclasses build it.

    batch_size: training examples per batch of pyDVL's curvature products."""

    #: the name in messages and the registry
    name = "pydvl"

    def __init__(self, damping: float | None = None, batch_size: int = 1000):
        require("pydvl", "pydvl", self.name)
        self.damping = damping
        self.batch_size = batch_size

    def _influence_model(self, module: nn.Module, mu: float):
        raise NotImplementedError

    def fit(self, problem: Problem) -> "_PyDVLSolver":
        inputs, targets = problem.train
        outputs = problem.outputs(inputs)
        R = psd_sqrt(output_hessians(problem.loss, outputs, targets))
        packed = torch.cat([outputs.unsqueeze(-1), R], dim=-1)  # (N, C, 1 + C)
        loader = DataLoader(TensorDataset(inputs, packed), batch_size=self.batch_size)
        self.mu_ = effective_damping(problem, self.damping)
        self.model_ = self._influence_model(problem.module(), self.mu_).fit(loader)
        blocks = list(self.model_.block_mapper.composable_block_dict.values())
        if len(blocks) != 1:
            raise ValueError(f"{self.name}: expected one full block, pyDVL made {len(blocks)}")
        self.operator_ = blocks[0].op
        self.problem_ = problem
        return self

    def parameter_change(self, train_idx: Tensor) -> Tensor:
        """ε (G + μI)⁻¹ ∇ℓₘ by pyDVL's solver, (len(train_idx), d)."""
        p = self.problem
        B = p.epsilon * p.train_gradients(train_idx)
        return self.operator_.apply(B).to(p.dtype)


class PyDVLCG(_PyDVLSolver):
    """pyDVL's CgInfluence (conjugate gradients on H + reg·I): maxiter, rtol, atol as pyDVL's."""

    name = "pydvl-cg"
    description = "pyDVL's conjugate gradients (CgInfluence) on the damped Gauss-Newton matrix"

    def __init__(self, damping: float | None = None, maxiter: int = 100, rtol: float = 1e-6, atol: float = 1e-12,
                 batch_size: int = 1000):
        super().__init__(damping, batch_size)
        self.maxiter = maxiter
        self.rtol = rtol
        self.atol = atol

    @property
    def batch_rtol(self) -> float:
        return 100.0 * self.rtol  # as estimators/cg.py: a row is defined to about κ · rtol

    def _influence_model(self, module, mu):
        from pydvl.influence.torch import CgInfluence
        return CgInfluence(module, _surrogate_loss, regularization=mu, maxiter=self.maxiter, rtol=self.rtol,
                           atol=self.atol, solve_simultaneously=True, warn_on_max_iteration=False)


class PyDVLLiSSA(_PyDVLSolver):
    """pyDVL's LissaInfluence: x ← b + (1 − dampen) x − (H_B + reg·I) x / scale on random minibatches B
    of the fit data, maxiter steps or a max relative change < rtol, returning x / scale
    (→ (H + reg·I + scale·dampen·I)⁻¹ b; scale must exceed the largest eigenvalue of H + reg·I)."""

    name = "pydvl-lissa"
    description = "pyDVL's LiSSA (LissaInfluence) on the damped Gauss-Newton matrix"
    batch_rtol = 1e-3

    def __init__(self, damping: float | None = None, maxiter: int = 1000, scale: float = 10.0, dampen: float = 0.0,
                 rtol: float = 1e-6, batch_size: int = 100):
        super().__init__(damping, batch_size)
        self.maxiter = maxiter
        self.scale = scale
        self.dampen = dampen
        self.rtol = rtol

    def parameter_change(self, train_idx: Tensor) -> Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.problem.seed)
            return super().parameter_change(train_idx)

    def _influence_model(self, module, mu):
        from pydvl.influence.torch import LissaInfluence
        return LissaInfluence(module, _surrogate_loss, regularization=mu, maxiter=self.maxiter, scale=self.scale,
                              dampen=self.dampen, rtol=self.rtol, warn_on_max_iteration=False)


class PyDVLArnoldi(_PyDVLSolver):
    """pyDVL's ArnoldiInfluence: the top `rank` eigenpairs (V, D) of H (ARPACK), x = V (D + reg)⁻¹ Vᵀ b
    (nothing outside their span unless use_woodbury)."""

    name = "pydvl-arnoldi"
    description = "pyDVL's Arnoldi low-rank inverse (ArnoldiInfluence) of the damped Gauss-Newton matrix"

    def __init__(self, damping: float | None = None, rank: int = 50, use_woodbury: bool = False,
                 batch_size: int = 1000):
        super().__init__(damping, batch_size)
        self.rank = rank
        self.use_woodbury = use_woodbury

    def _influence_model(self, module, mu):
        from pydvl.influence.torch import ArnoldiInfluence
        return ArnoldiInfluence(module, _surrogate_loss, regularization=mu, rank=self.rank,
                                use_woodbury=self.use_woodbury)


class PyDVLNystroem(_PyDVLSolver):
    """pyDVL's NystroemSketchInfluence: a randomized rank-`rank` Nyström sketch U Λ Uᵀ of H, inverted by
    Woodbury: x = U (Λ + reg)⁻¹ Uᵀ b + (b − U Uᵀ b) / reg."""

    name = "pydvl-nystroem"
    description = "pyDVL's Nystroem sketch (NystroemSketchInfluence) of the damped Gauss-Newton matrix"

    def __init__(self, damping: float | None = None, rank: int = 50, batch_size: int = 1000):
        super().__init__(damping, batch_size)
        self.rank = rank

    def _influence_model(self, module, mu):
        from pydvl.influence.torch import NystroemSketchInfluence
        return NystroemSketchInfluence(module, _surrogate_loss, regularization=mu, rank=self.rank)


class PyDVLEKFAC(ParameterEstimator):
    """pyDVL's EkfacInfluence (its own cross-entropy EK-FAC; module docstring), damping μ = wd + λ."""

    description = "pyDVL's EK-FAC (EkfacInfluence; its own cross-entropy pseudo-gradients, Linear layers only)"

    def __init__(self, damping: float | None = None, update_diagonal: bool = True, batch_size: int = 256):
        require("pydvl", "pydvl", "pydvl-ekfac")
        self.damping = damping
        self.update_diagonal = update_diagonal
        self.batch_size = batch_size

    def fit(self, problem: Problem) -> "PyDVLEKFAC":
        from pydvl.influence.torch import EkfacInfluence

        inputs, targets = problem.train
        probe = slice(0, min(8, len(inputs)))
        if targets.dtype.is_floating_point or not torch.allclose(
                problem.loss(problem.outputs(inputs[probe]), targets[probe]),
                F.cross_entropy(problem.outputs(inputs[probe]), targets[probe], reduction="none")):
            raise ValueError("pydvl-ekfac: pyDVL's EK-FAC supports cross-entropy classification only; "
                             f"task {problem.task!r} has another loss")
        self.mu_ = effective_damping(problem, self.damping)
        self.problem_ = problem
        with _default_dtype(problem.dtype):
            self.model_ = EkfacInfluence(problem.module(), update_diagonal=self.update_diagonal,
                                         hessian_regularization=self.mu_)
            self.model_.fit(DataLoader(TensorDataset(inputs, targets), batch_size=self.batch_size))
        passes = 2 if self.update_diagonal else 1
        problem.counter.add("forward", passes * len(inputs))
        problem.counter.add("gradient", passes * len(inputs))
        return self

    def parameter_change(self, train_idx: Tensor) -> Tensor:
        """ε (pyDVL's EK-FAC + μI)⁻¹ ∇ℓₘ, gradients by pyDVL, (len(train_idx), d)."""
        p = self.problem
        train = p.train.subset(train_idx.to(p.device))
        with _default_dtype(p.dtype):
            X = self.model_.influence_factors(*train)
        p.counter.add("gradient", len(train))
        return p.epsilon * X.detach().to(p.dtype)
