"""`lissa`: LiSSA (Agarwal et al. 2017) with the Gauss–Newton Hessian, as in Koh & Liang.

Solves (G + μI) x = b, b = ε ∇ℓₘ, μ = wd + λ, by the truncated Neumann recursion
    h₀ = b,  h_j = b + (I − (G_Bj + μI)/s) h_{j−1},  x ≈ h_J / s,
with G_Bj the Gauss–Newton matrix of a fresh minibatch Bj at every step (shared by all
removed examples), averaged over `repeats` independent recursions. Truncation at depth J acts
like extra damping of about s/J (Vicol et al. 2022).

Defaults: batch 128, 1 repeat, minibatch products in float32 (below), scale s = 2 (λ_max(G) + μ)
with λ_max from 20 power iterations on the full-batch G in `fit`, and the depth rule

    J = clip(⌈s/μ⌉, MIN_DEPTH = 100, MAX_DEPTH = 2000)        (`depth=None`; `depth=J` overrides it)

Why s/μ: along an eigenvector of G with eigenvalue λᵢ the full-batch recursion leaves the
fraction (1 − (λᵢ + μ)/s)^J ≈ exp(−J(λᵢ + μ)/s) of the solution unreached, which acts like an
extra damping of about s/J. J = s/μ keeps that extra damping at about μ itself (the truncated
solve is damped about twice as much as the exact one, not 1 + s/(Jμ) times) and leaves e⁻¹ of the
slowest direction unreached;
Koh & Liang's rule (depth × batch ≈ N) ignores the spectrum and gives J ≈ 8 here. The clip keeps
tiny problems from taking a handful of steps and stiff ones from running for ever: the
batch-norm CNNs at smoke scale have s/μ > 5000, and at 5000 steps their LiSSA rows took 3.5–7.5
min each on the shared 2-core machine (most of the CI run), at 2000 about 40 % of that. 2000
costs little accuracy where the rule asks for more: 0.973 against 0.972 at 3000 on mlp-mnist
(below); `lissa-depth5000` runs the longer recursion.
Measured on the mlp-mnist `cpu` problem (N = 1000, d = 13,002, μ = 0.006, s = 17.95, s/μ = 2992),
mean per-query Pearson with `exact` over the ground truth's 40 removed examples and 40 queries
(benchmark.metrics.correlations): depth 500: 0.833, 1000 (the old fixed default): 0.901, 1500: 0.955,
2000: 0.973, 3000: 0.972, 4000: 0.980, 5000: 0.992 (minibatch noise makes it not quite monotone).
The rule alone gives J = 2993 there (0.973, 95 % bootstrap interval 0.953–0.985), the cap 2000
(0.973), against 0.901 (0.845–0.922) for the old fixed default 1000; 2× the old default's
minibatch Gauss–Newton products (the old default takes ≈ 8 s on an idle machine, so ≈ 16 s).

Sharp minibatches. Each step is b plus a map of norm ≤ 1 only while λ_max(G_B) + μ ≤ 2s, and
then ‖h_j‖ ≤ (j + 1)‖b‖. The full-batch λ_max can be far below a minibatch's: on alexnet-mnist
at `cpu` λ_max(G) = 5.83 (s = 11.7) while 40 minibatches of 128 had λ_max(G_B) of median 13.4 and
max 34.9, and the recursion amplified rows to finite nonsense (Pearson −0.03, outputs
overflowing). So a row that breaks the bound at any step is rerun with s doubled (and J by the
same rule), at most MAX_SCALE_DOUBLINGS times, then LiSSA raises; the other rows are untouched,
and `solver_` counts the rerun rows.

Float32 products. `gauss_newton_dtype="float32"` runs only the products G_B h on a float32 copy
of the problem (Problem.lowered: the kept Jacobians, rounded); h, b and the answer stay in the
problem's dtype, so each step adds float32 rounding (≈ 1e-7 of G_B h) to a recursion whose
minibatch noise is of order 1/√batch. Measured (one thread, idle machine): a step of 40 vectors
over 128 examples on alexnet-cifar at `cpu` 107 → 38 ms, mlp-mnist 19.5 → 8.1 ms,
transformer-ptb (25 vectors) 581 → 245 ms; the lenet-mnist `cpu` row 62.7 → 34.9 s with Pearson
0.8736382 → 0.8736376, Spearman equal, scores within 4.5e-6 (relative). None keeps every product
in the problem's dtype. A row that breaks the stable bound below leaves the recursion at that
step (its rerun starts afresh), so a pass at too small a scale costs only the steps until then.

The full batch. When `batch_size` ≥ N every "minibatch" is the whole training set, so every step
applies the same G and the recursion has a closed form in G's eigenbasis (G = Q diag(λ) Qᵀ):

    x = Q diag(φ(λ)) Qᵀ b,   φ(λ) = (1 − (1 − (λ + μ)/s)^(J+1)) / (λ + μ)   (→ (J+1)/s as λ + μ → 0),

the same J-step truncated solve up to rounding (tests/test_new_estimators.py pins the paths
together), repeats included (they are all equal). Where G's factor F (G = FᵀF/N, N·C rows) has
fewer than d/2 rows (linalg.KernelSolver.cheaper) the eigenbasis comes from the N·C × N·C kernel
FFᵀ/N instead, and no d × d matrix is formed; otherwise the closed form is used where
d ≤ DENSE_MAX_PARAMS and the dense G costs at most DENSE_MAX_FLOPS (N·C·d², as for `exact`), at
that cost and one eigendecomposition. The kernel took the smoke fit of vgg13-cifar (d = 2550,
N·C = 640) from 13.2 to 3.9 s and of vgg13-mnist from 7.9 to 0.7 s (one thread, both cores busy;
scores equal to 13 digits). Every smoke-scale network has N =
64 < 128, where the J = 2000 full-batch products of the batch-norm CNNs took 38–81 s a row on the
shared 2-core machine (resnet20-cifar: 80.7 s; each product over the 64 images is overhead-bound,
47 ms for 4 vectors against 9 ms for a plain forward + backward), and the eigendecomposition of
d = 1356 takes 0.4 s (d = 2550: 3.1 s, d = 4096: 17 s, one thread).
"""
from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from benchmark.linalg import KernelSolver, add_gram_, top_eigenvalue
from benchmark.problem import Problem

from .base import ParameterEstimator, dense_gauss_newton_flops, dtype_option, effective_damping

log = logging.getLogger("ifbench")


def lissa_depth(scale: float, mu: float) -> int:
    """The default recursion depth ⌈s/μ⌉, clipped to [LiSSA.MIN_DEPTH, LiSSA.MAX_DEPTH] (module docstring)."""
    return int(min(LiSSA.MAX_DEPTH, max(LiSSA.MIN_DEPTH, math.ceil(scale / mu))))


class LiSSA(ParameterEstimator):
    description = "LiSSA with minibatch Gauss-Newton products (float32 products, float64 recursion)"

    #: the depth rule J = clip(⌈s/μ⌉, MIN_DEPTH, MAX_DEPTH), used when depth is None
    MIN_DEPTH = 100
    MAX_DEPTH = 2000
    #: rows whose recursion grew beyond the stable bound are rerun at twice the scale, at most this often
    MAX_SCALE_DOUBLINGS = 3
    #: the full-batch closed form (module docstring) is used up to this many parameters
    DENSE_MAX_PARAMS = 4096
    DENSE_MAX_FLOPS = 2e12

    def __init__(self, damping: float | None = None, depth: int | None = None, scale: float | None = None,
                 batch_size: int = 128, repeats: int = 1, seed: int = 0, gauss_newton_dtype: str | None = "float32"):
        self.damping = damping
        self.depth = depth
        self.scale = scale
        self.batch_size = batch_size
        self.repeats = repeats
        self.seed = seed
        self.gauss_newton_dtype = gauss_newton_dtype

    def fit(self, problem: Problem) -> "LiSSA":
        self.mu_ = effective_damping(problem, self.damping)
        self.problem_ = problem
        if self.scale is None:
            g = torch.Generator().manual_seed(problem.seed + self.seed)
            lam = top_eigenvalue(problem.gnvp, problem.n_params, problem.dtype, problem.device, 20, g)
            self.scale_ = 2.0 * (lam + self.mu_)
        else:
            self.scale_ = float(self.scale)
        self.depth_ = lissa_depth(self.scale_, self.mu_) if self.depth is None else int(self.depth)
        self.eigh_ = self.kernel_ = None
        dtype = dtype_option(self.gauss_newton_dtype, "lissa", "gauss_newton_dtype", problem.dtype)
        recursion = self.batch_size < problem.n_train
        self.products_ = problem.lowered(dtype) if recursion and dtype != problem.dtype else problem
        self.rows_rescaled_ = 0
        if self.batch_size >= problem.n_train:  # every step applies the same G: the closed form
            n, d = problem.n_train, problem.n_params
            if KernelSolver.cheaper(n * problem.n_outputs, d):
                F = problem.gauss_newton_rows()  # (m, d), G = FᵀF / n
                lam, V = torch.linalg.eigh(add_gram_(torch.zeros(len(F), len(F), dtype=F.dtype), F.T) / n)
                self.kernel_ = (F, lam, V)
            elif d <= self.DENSE_MAX_PARAMS and dense_gauss_newton_flops(problem) <= self.DENSE_MAX_FLOPS:
                self.eigh_ = torch.linalg.eigh(problem.gauss_newton_matrix())
        return self

    def _phi(self, lam: Tensor) -> Tensor:
        """φ(λ) = (1 − (1 − (λ + μ)/s)^(J+1)) / (λ + μ), the J-step recursion's h_J / s along an
        eigenvector of G with eigenvalue λ (→ (J+1)/s as λ + μ → 0)."""
        curvature = lam + self.mu_
        a = curvature / self.scale_
        tiny = a.abs() < 1e-12
        return torch.where(tiny, (self.depth_ + 1) / self.scale_,
                           (1 - torch.pow(1 - a, self.depth_ + 1)) / torch.where(tiny, 1.0, curvature))

    def _closed_form(self, b: Tensor) -> Tensor:
        """The J-step full-batch recursion's h_J / s for b (k, d) -> (k, d) (module docstring):
        Q φ(Λ) Qᵀ b from the eigenbasis of the dense G, or, from the kernel FFᵀ/n = V Λ Vᵀ
        (m, m) of G = FᵀF/n, whose nonzero eigenvectors are Fᵀ V Λ^(-1/2) / √n,
        φ(0) b + Fᵀ V diag((φ(Λ) − φ(0)) / (nΛ)) Vᵀ F b."""
        if self.eigh_ is not None:
            lam, Q = self.eigh_
            return ((b @ Q) * self._phi(lam)) @ Q.T
        F, lam, V = self.kernel_
        phi0 = self._phi(torch.zeros((), dtype=lam.dtype))
        null = lam <= 1e-12 * lam.max()  # G's null space: Fᵀv ≈ 0 there, φ(0) already applies
        psi = torch.where(null, 0.0, (self._phi(lam) - phi0) / (self.problem_.n_train * torch.where(null, 1.0, lam)))
        return phi0 * b + (((b @ F.T) @ V) * psi) @ (V.T @ F)

    @property
    def solver_(self) -> str:
        """How the fitted estimator solves: "closed form (dense)", "closed form (kernel)" or
        "recursion", with the rows whose scale was doubled (recorded with each result)."""
        if self.eigh_ is not None or self.kernel_ is not None:
            return f"closed form ({'dense' if self.eigh_ is not None else 'kernel'})"
        return "recursion" + (f"; scale doubled for {self.rows_rescaled_} row(s)" if self.rows_rescaled_ else "")

    def parameter_change(self, train_idx: Tensor) -> Tensor:
        p = self.problem
        b = p.epsilon * p.train_gradients(train_idx)
        if self.eigh_ is not None or self.kernel_ is not None:
            return self._checked(self._closed_form(b), self.scale_)
        out, todo = torch.empty_like(b), torch.arange(len(b), device=b.device)
        s, depth = self.scale_, self.depth_
        for doublings in range(self.MAX_SCALE_DOUBLINGS + 1):
            x, stable = self._recursion(b[todo], s, depth)
            out[todo[stable]] = x[stable]
            todo = todo[~stable]
            if not len(todo):
                return out
            if doublings == self.MAX_SCALE_DOUBLINGS:
                break
            self.rows_rescaled_ += len(todo) if doublings == 0 else 0
            log.info("lissa: %d of %d rows grew beyond the stable bound at scale %.3g (a minibatch's curvature above "
                     "2s); rerunning them at scale %.3g", len(todo), len(b), s, 2 * s)
            s = 2 * s
            depth = lissa_depth(s, self.mu_) if self.depth is None else depth
        raise FloatingPointError(f"LiSSA diverged: {len(todo)} row(s) still grew beyond the stable bound at scale "
                                 f"{s:.3g} ({self.MAX_SCALE_DOUBLINGS} doublings of {self.scale_:.3g}); the minibatch "
                                 "Gauss-Newton matrices are far sharper than the full batch: pass a larger `scale`")

    def _recursion(self, b: Tensor, s: float, depth: int) -> tuple[Tensor, Tensor]:
        """The minibatch recursion's h_J / s for b (k, d), averaged over the repeats -> (x (k, d),
        stable (k,) bool). Where every minibatch has λ_max(G_B) + μ ≤ 2s, each step maps h to
        b + (I − (G_B + μI)/s) h with ‖I − (G_B + μI)/s‖ ≤ 1, so ‖h_j‖ ≤ (j + 1)‖b‖; a row that
        exceeds that bound was amplified by a sharper minibatch and is not `stable`, and leaves
        the recursion at once (its x is left at 0). The minibatches depend only on the seed, so a
        row's answer does not depend on the other rows. h is kept in the problem's dtype; only
        G_B h runs in `products_` (gauss_newton_dtype)."""
        p, low = self.problem, self.products_
        g = torch.Generator().manual_seed(p.seed + self.seed + 1)
        b_norm = torch.linalg.vector_norm(b, dim=-1)
        stable = torch.ones(len(b), dtype=torch.bool, device=b.device)
        total = torch.zeros_like(b)
        for _ in range(self.repeats):
            live = stable.nonzero().flatten()  # the rows still in the recursion
            b_live, bound = b[live], b_norm[live] * (1 + 1e-9)
            h = b_live.clone()
            for j in range(depth):
                if not len(live):
                    return total / self.repeats, stable
                rows = torch.randperm(p.n_train, generator=g)[:self.batch_size].to(p.device)
                h = b_live + h - (low.gnvp(h.to(low.dtype), rows=rows).to(h.dtype) + self.mu_ * h) / s
                ok = torch.linalg.vector_norm(h, dim=-1) <= (j + 2) * bound
                if not ok.all():
                    stable[live[~ok]] = False
                    live, b_live, bound, h = live[ok], b_live[ok], bound[ok], h[ok]
            total[live] += h / s
        return total / self.repeats, stable & torch.isfinite(total).all(dim=-1)

    @staticmethod
    def _checked(h: Tensor, s: float) -> Tensor:
        if not torch.isfinite(h).all():
            raise FloatingPointError(f"LiSSA diverged: scale {s:.3g} is below the largest eigenvalue of "
                                     "the minibatch Gauss-Newton matrix; pass a larger `scale`")
        return h
