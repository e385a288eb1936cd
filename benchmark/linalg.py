"""Linear solvers shared by the ground truth and the estimators.

Every solve is batched over k right-hand sides stacked as rows, B of shape (k, d).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]  # (k, d) -> (k, d), symmetric positive definite
RowMatVec = Callable[[Tensor, Tensor], Tensor]  # (V (a, d), rows (a,)) -> (a, d): row rows[i]'s operator on V[i]


@dataclass(frozen=True)
class SolveInfo:
    """How a batched solve ended: iterations taken, the true relative residual of each row
    ‖b − A x‖ / ‖b‖ (k,), and whether every row reached the tolerance."""

    method: str
    iterations: int
    relative_residual: Tensor
    converged: bool

    def as_dict(self) -> dict:
        return {
            "method": self.method,
            "iterations": self.iterations,
            "max_relative_residual": float(self.relative_residual.max()) if self.relative_residual.numel() else 0.0,
            "converged": self.converged,
        }


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(dim=-1)


def relative_residual(matvec: MatVec, X: Tensor, B: Tensor) -> Tensor:
    """‖B − A X‖ / ‖B‖ per row, (k,)."""
    bnorm = torch.linalg.vector_norm(B, dim=-1).clamp_min(torch.finfo(B.dtype).tiny)
    return torch.linalg.vector_norm(B - matvec(X), dim=-1) / bnorm


def batched_cg(matvec: MatVec | RowMatVec, B: Tensor, *, rtol: float, maxiter: int, X0: Tensor | None = None,
               precondition: MatVec | RowMatVec | None = None, true_residual: bool = True, per_row: bool = False) -> tuple[Tensor, SolveInfo]:
    """Solve A X = B row by row with (preconditioned) conjugate gradients, all rows batched.

    A: symmetric positive definite, given as matvec on (k, d); precondition: M⁻¹ applied to
    (k, d), M SPD (default identity). Rows that reach ‖r‖ ≤ rtol ‖b‖ stop, and from then on
    cost nothing: matvec and precondition are applied to the unconverged rows only (a, d).
    per_row: the operator differs from row to row (the PBRF's, at each row's own θ); matvec and
    precondition are then called as f(V, rows), V (a, d) holding rows `rows` (a,) of B.
    Returns X (k, d) and the true residual of every row (true_residual=False: the recursively
    updated residual instead, saving one product, for inexact inner solves checked elsewhere).
    """
    if per_row:
        A, M = matvec, precondition if precondition is not None else (lambda V, rows: V)
    else:
        A = lambda V, rows: matvec(V)
        M = (lambda V, rows: precondition(V)) if precondition is not None else (lambda V, rows: V)
    everything = torch.arange(B.shape[0], device=B.device)
    X = torch.zeros_like(B) if X0 is None else X0.clone()
    R = B - A(X, everything) if X0 is not None else B.clone()
    target = (rtol * torch.linalg.vector_norm(B, dim=-1)) ** 2
    rows = everything[_rowdot(R, R) > target]  # the unconverged rows; P, Z, rz hold only those
    Ra = R[rows]
    P = M(Ra, rows)
    rz = _rowdot(Ra, P)
    it = 0
    while it < maxiter and len(rows):
        AP = A(P, rows)
        alpha = rz / _rowdot(P, AP)
        X.index_add_(0, rows, alpha[:, None] * P)
        Ra = Ra - alpha[:, None] * AP
        R[rows] = Ra
        it += 1
        still = _rowdot(Ra, Ra) > target[rows]
        if not bool(still.any()) or it == maxiter:  # the next direction would go unused
            break
        rows, Ra, P, rz = rows[still], Ra[still], P[still], rz[still]
        Z = M(Ra, rows)
        rz_new = _rowdot(Ra, Z)
        P = Z + (rz_new / rz)[:, None] * P
        rz = rz_new
    if true_residual:
        res = relative_residual(lambda V: A(V, everything), X, B)
    else:
        res = torch.linalg.vector_norm(R, dim=-1) / torch.linalg.vector_norm(B, dim=-1).clamp_min(
            torch.finfo(B.dtype).tiny)
    return X, SolveInfo("cg", it, res, bool((res <= rtol * 10).all()))


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


def add_gram_(G: Tensor, A: Tensor, block: int = 1024) -> Tensor:
    """G += Aᵀ A in place for A (n, d), G (d, d) symmetric, computing only the lower block
    triangle (column blocks of `block`) and mirroring it: about half the flops of Aᵀ A."""
    d = A.shape[1]
    for j0 in range(0, d, block):
        j1 = min(j0 + block, d)
        lower = G[j0:, j0:j1]
        lower.addmm_(A[:, j0:].T, A[:, j0:j1])
        G[j0:j1, j1:] = lower[j1 - j0:].T
        diagonal = lower[:j1 - j0]
        diagonal.copy_(diagonal.tril() + diagonal.tril(-1).T)
    return G


class NystromPreconditioner:
    """M⁻¹ ≈ (A + μI)⁻¹ for a PSD A (d, d) from a rank-ℓ randomized Nyström approximation
    A ≈ U diag(λ) Uᵀ (Frangella, Tropp & Udell 2023, "Randomized Nyström preconditioning"):

        M⁻¹ = (λ_ℓ + μ) U (diag(λ) + μI)⁻¹ Uᵀ + (I − U Uᵀ),

    built from ℓ products A Ω with a random orthonormal Ω (d, ℓ), in any dtype (the products may
    be float32: M only steers CG, whose residual is measured in its own products). With the ℓ
    largest eigenvalues captured, preconditioned CG sees a condition number of about
    (λ_ℓ + μ)/μ instead of (λ₁ + μ)/μ. U (d, ℓ) is kept in `dtype`."""

    def __init__(self, matvec: MatVec, d: int, rank: int, mu: float, generator: torch.Generator, *,
                 products_dtype: torch.dtype, dtype: torch.dtype = torch.float64, device=None, chunk: int = 50):
        """matvec: A on (k, d) in products_dtype; the ℓ = min(rank, d) vectors go through it
        `chunk` at a time; the factorisations run in float64."""
        rank = min(rank, d)
        omega = torch.linalg.qr(torch.randn(d, rank, generator=generator, dtype=torch.float64))[0].to(device)
        low = omega.to(products_dtype)
        Y = torch.cat([matvec(low[:, i:i + chunk].T.contiguous()) for i in range(0, rank, chunk)]).T.double()
        shift = torch.finfo(products_dtype).eps * float(torch.linalg.matrix_norm(Y))  # keeps ΩᵀYν positive
        Y = Y + shift * omega
        C = torch.linalg.cholesky(omega.T @ Y)  # Ωᵀ(A + νI)Ω = C Cᵀ
        U, sigma, _ = torch.linalg.svd(torch.linalg.solve_triangular(C, Y.T, upper=False).T, full_matrices=False)
        lam = (sigma ** 2 - shift).clamp_min(0)  # A ≈ U diag(λ) Uᵀ, λ descending
        self.U, self.eigenvalues = U.to(dtype), lam
        self.weights = ((lam[-1] + mu) / (lam + mu) - 1).to(dtype)  # M⁻¹ = I + U diag(w) Uᵀ

    def solve(self, V: Tensor) -> Tensor:
        """M⁻¹ vᵣ for every row of V (k, d) -> (k, d)."""
        W = V.to(self.U.dtype) @ self.U
        return (V.to(self.U.dtype) + (W * self.weights) @ self.U.T).to(V.dtype)


class CholeskySolver:
    """Dense solves with a fixed SPD matrix A (d, d), factorised once: A = L Lᵀ."""

    def __init__(self, A: Tensor):
        self.A = A
        self.L, info = torch.linalg.cholesky_ex(A)
        if int(info) != 0:
            raise torch.linalg.LinAlgError(f"matrix is not positive definite (leading minor {int(info)})")

    def solve(self, B: Tensor) -> Tensor:
        """A⁻¹ bᵣ for every row of B (k, d) -> (k, d): L Y = Bᵀ, then Lᵀ X = Y.

        Two triangular solves rather than torch.cholesky_solve: the same arithmetic, but MKL's
        potrs with few right-hand sides runs about 6× slower than its trsm (measured at d = 6000,
        k = 4, one thread: 0.42 s vs 0.073 s), and this solve is the PBRF's preconditioner."""
        Y = torch.linalg.solve_triangular(self.L, B.T.to(self.L.dtype), upper=False)
        return torch.linalg.solve_triangular(self.L.T, Y, upper=True).T.to(B.dtype)

    def lowered(self, dtype: torch.dtype) -> "CholeskySolver":
        """The same factor rounded to `dtype` (solves only, no matvec): an approximate inverse
        for preconditioning, half the memory traffic in float32 (the solves are memory-bound)."""
        low = object.__new__(CholeskySolver)
        low.A, low.L = None, self.L.to(dtype)
        return low

    def matvec(self, X: Tensor) -> Tensor:
        return X @ self.A

    def solve_with_info(self, B: Tensor) -> tuple[Tensor, SolveInfo]:
        X = self.solve(B)
        res = relative_residual(self.matvec, X, B)
        return X, SolveInfo("dense", 0, res, True)


class KernelSolver:
    """Solves with A = μI + FᵀF/n (d, d) for a factor F (m, d) with m < d, never forming A:
    by Woodbury, A⁻¹ = (1/μ) (I − Fᵀ (nμI + FFᵀ)⁻¹ F), the m×m kernel factorised once.

    Costs m²d/2 + m³/3 flops to set up against md²/2 + d³/3 for the dense Cholesky of A, and
    4md per right-hand side against 2d²: for a Gauss–Newton matrix G = FᵀF/n of n examples with
    C outputs each, m ≤ n·C, so it is the cheaper direct solve where n·C is below d/2 (`cheaper`:
    the smoke MLPs and most smoke CNNs). Same interface as CholeskySolver."""

    def __init__(self, F: Tensor, n: int, mu: float):
        self.F, self.n, self.mu = F, n, float(mu)
        K = add_gram_(torch.zeros(len(F), len(F), dtype=F.dtype, device=F.device), F.T)
        self.kernel = CholeskySolver(K + n * self.mu * torch.eye(len(F), dtype=F.dtype, device=F.device))

    @staticmethod
    def cheaper(m: int, d: int) -> bool:
        """Whether m rows make both the set-up and every solve cheaper than the dense ones (m < d/2).
        Measured on mlp-mnist at cpu (m = 10,000 rows, d = 13,002), where only the set-up is: set-up
        80 → 51 s, but its PBRF solve, whose preconditioner solves every inner iteration, 8.1 → 13.8 s
        for 8 removed examples (one thread)."""
        return 2 * m < d

    def solve(self, B: Tensor) -> Tensor:
        """A⁻¹ bᵣ for every row of B (k, d) -> (k, d)."""
        F = self.F
        W = self.kernel.solve(B.to(F.dtype) @ F.T)  # (k, m)
        return ((B.to(F.dtype) - W @ F) / self.mu).to(B.dtype)

    def lowered(self, dtype: torch.dtype) -> "KernelSolver":
        """The same solver rounded to `dtype` (solves only), as CholeskySolver.lowered."""
        low = object.__new__(KernelSolver)
        low.F, low.n, low.mu, low.kernel = self.F.to(dtype), self.n, self.mu, self.kernel.lowered(dtype)
        return low

    def matvec(self, X: Tensor) -> Tensor:
        return self.mu * X + (X @ self.F.T) @ self.F / self.n

    def solve_with_info(self, B: Tensor) -> tuple[Tensor, SolveInfo]:
        X = self.solve(B)
        res = relative_residual(self.matvec, X, B)
        return X, SolveInfo("kernel", 0, res, True)
