"""A second, independent solve of the PBRF: the ground truth's error bar (DESIGN.md §6, layers 2–3).

The first solve (benchmark.responses.pbrf) is Gauss–Newton with a leave-one-out preconditioner,
all removed examples vmapped together, from Δ = 0. This one shares neither optimizer, start nor
objective code with it: full-batch float64 L-BFGS (two-loop recursion, backtracking line search),
one removed example at a time, started from the linearized solution, on the PBRF objective
written from DESIGN.md §1 with plain autograd:

  J_m(Δ) = (1/N) Σᵢ D_L(f(θˢ+Δ, xᵢ), f(θˢ, xᵢ)) + (μ/2)‖Δ‖² − ε ℓₘ(θˢ+Δ),
  D_L(y, yˢ) = L(y, t) − L(yˢ, t) − ∇_y L(yˢ, t)ᵀ (y − yˢ),     μ = wd + λ, ε = 1/N,

to the same certificate ‖∇J_m‖ ≤ tol · ε‖∇ℓₘ(θˢ)‖ where it can. Optionally (a task's
GroundTruthConfig.second_solve_preconditioned) L-BFGS's initial inverse Hessian is H₀ = (G + μI)⁻¹
at θˢ instead of γI: a preconditioner changes the path, not the point that the plain-autograd
certificate accepts, so an error in G could slow the solve but not bias what it certifies.
The two solves' score matrices
(Q, K) on the same K removed examples give, per removed example, the relative error
‖s₁ − s₂‖ / ‖s₁‖ over the queries, and the per-query Pearson between them across the K
examples: the ceiling a perfect estimator could reach given the noise in the ground truth.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .linalg import batched_cg
from .metrics import correlations
from .problem import Problem

log = logging.getLogger("ifbench")

METHOD = "full-batch L-BFGS from the linearized solution"
METHOD_PRECONDITIONED = "full-batch L-BFGS on H₀ = (G + μI)⁻¹ from the linearized solution"
#: bump when the second solve changes in a way that changes its numbers (part of its cache key)
VERSION = 1


@dataclass(frozen=True)
class SecondSolveSettings:
    """max_iterations: L-BFGS iterations per removed example; history: L-BFGS memory;
    max_halvings: backtracking steps before a line search gives up ("stalled"); rounding: a change
    of J below rounding × the size of J's terms counts as float64 noise (see _lbfgs_one);
    check_every: iterations between stall checks; stall_checks: stop as "stalled" when the
    smallest ‖∇J‖ has not halved over this many checks; basin_factor: stop as "left_basin" when
    ‖Δ‖ exceeds this times the linearized solution's norm; start_rtol: relative residual of the
    matrix-free CG that gives the starting point ε (G + μI)⁻¹ ∇ℓₘ."""

    max_iterations: int = 2000
    history: int = 20
    max_halvings: int = 30
    rounding: float = 1e-13
    check_every: int = 25
    stall_checks: int = 8
    basin_factor: float = 10.0
    start_rtol: float = 1e-6
    start_maxiter: int = 2000


#: the settings of the preconditioned solve (H₀ = (G + μI)⁻¹): its iterations are near-Newton
#: steps, so a row whose ‖∇J‖ has not halved in 50 of them (5 checks of 10) has stalled, where
#: plain L-BFGS gets 200 (8 checks of 25)
PRECONDITIONED = SecondSolveSettings(check_every=10, stall_checks=5)


class DirectPBRFObjective:
    """J_m and ∇J_m (d,) for one removed training example m, by reverse-mode autograd over
    the training set in chunks. f(θˢ, x) and ∇_y L(yˢ, t) are computed once (n, C)."""

    def __init__(self, problem: Problem, mu: float):
        self.problem, self.mu = problem, mu
        p = problem
        self.base = []
        for s in range(0, p.n_train, p.chunk_size):
            x, t = p.train.inputs[s:s + p.chunk_size], p.train.targets[s:s + p.chunk_size]
            ys = p.model(p.params, x).detach().requires_grad_(True)
            gs, = torch.autograd.grad(p.loss(ys, t).sum(), ys)
            self.base.append((x, t, ys.detach(), gs.detach(), p.loss(ys, t).detach()))
        self.mean_abs_loss = float(sum(b[4].abs().sum() for b in self.base)) / p.n_train

    def magnitude(self, m: int) -> float:
        """The size of the terms J_m is a difference of, (1/N) Σᵢ |ℓᵢ(θˢ)| + ε |ℓₘ(θˢ)|: its float64
        rounding is about machine epsilon times this."""
        p = self.problem
        own = p.loss(p.outputs(p.train.inputs[m:m + 1]), p.train.targets[m:m + 1])[0]
        return self.mean_abs_loss + p.epsilon * abs(float(own))

    def __call__(self, Delta: Tensor, m: int) -> tuple[float, Tensor]:
        """J_m(Δ) and ∇J_m(Δ) for Δ (d,)."""
        p = self.problem
        p.counter.add("gradient", p.n_train + 1)
        theta = (p.params + Delta).detach().requires_grad_(True)
        with torch.enable_grad():
            data = theta.new_zeros(())
            for x, t, ys, gs, ls in self.base:
                y = p.model(theta, x)
                data = data + (p.loss(y, t) - ls - (gs * (y - ys)).flatten(1).sum(1)).sum()
            own = p.loss(p.model(theta, p.train.inputs[m:m + 1]), p.train.targets[m:m + 1])[0]
            J = data / p.n_train + 0.5 * self.mu * (theta - p.params).pow(2).sum() - p.epsilon * own
            g, = torch.autograd.grad(J, theta)
        return float(J.detach()), g.detach()


def _two_loop(g: Tensor, S: list[Tensor], Y: list[Tensor], initial: Callable[[Tensor], Tensor]) -> Tensor:
    """H g for the L-BFGS inverse-Hessian model H of the pairs (S, Y) on H₀ = `initial` (d,) -> (d,)
    (Nocedal–Wright 7.4)."""
    q, alphas = g.clone(), []
    for s, y in zip(reversed(S), reversed(Y)):
        a = float(s @ q) / float(y @ s)
        q -= a * y
        alphas.append(a)
    q = initial(q)
    for (s, y), a in zip(zip(S, Y), reversed(alphas)):
        q += (a - float(y @ q) / float(y @ s)) * s
    return q


def _lbfgs_one(objective: DirectPBRFObjective, m: int, start: Tensor, scale: float, tol: float,
               settings: SecondSolveSettings, precondition: Callable[[Tensor], Tensor] | None = None
               ) -> tuple[Tensor, dict]:
    """L-BFGS on J_m from Δ = start (d,) -> Δ (d,) and this row's certificate.

    H₀ = γI with γ = sᵀy / yᵀy of the newest pair (1/μ before the first), or, with
    `precondition` (V (k, d) -> M⁻¹V for a fixed SPD M ≈ ∇²J_m), H₀ = M⁻¹; then the line search
    starts from min(1, 2 t) of the last accepted step t, not from 1: on a ReLU net's kinks
    the near-Newton step overshoots by orders of magnitude, and halving from 1 every iteration
    cost lenet-mnist's stalled rows 7-13 evaluations an iteration (measured).

    Backtracking line search from t = 1: accept when J decreases enough (Armijo), or, where the
    change of J is below its float64 rounding (near the minimum J is a difference of terms many
    orders larger than J − J*), when ‖∇J‖ decreases. Pairs with sᵀy ≤ 0 are skipped."""
    mu = objective.mu
    x = start.clone()
    J, g = objective(x, m)
    rounding = settings.rounding * objective.magnitude(m)
    rel = float(torch.linalg.vector_norm(g)) / scale
    start_norm = float(torch.linalg.vector_norm(start))
    S: list[Tensor] = []
    Y: list[Tensor] = []
    best, status, evaluations, iterations, last_step = [rel], "max_iterations", 1, 0, 1.0
    while rel > tol and iterations < settings.max_iterations:
        if precondition is not None:
            initial = lambda q: precondition(q[None])[0]
        else:
            gamma = float(S[-1] @ Y[-1]) / float(Y[-1] @ Y[-1]) if S else 1.0 / mu
            initial = lambda q: gamma * q
        d = -_two_loop(g, S, Y, initial)
        slope = float(g @ d)
        if slope >= 0:  # not a descent direction: forget the memory
            S, Y = [], []
            if precondition is not None:
                d = -initial(g)
                slope = float(g @ d)
            else:
                d, slope = -g / mu, -float(g @ g) / mu
        t, accepted = (1.0 if precondition is None else min(1.0, 2 * last_step)), False
        gnorm = float(torch.linalg.vector_norm(g))
        for _ in range(settings.max_halvings):
            J_t, g_t = objective(x + t * d, m)
            evaluations += 1
            armijo = J_t <= J + 1e-4 * t * slope
            flat = abs(J_t - J) <= rounding and float(torch.linalg.vector_norm(g_t)) < gnorm
            if armijo or flat:
                accepted = True
                break
            t /= 2
        iterations += 1
        if not accepted:
            status = "stalled"
            break
        last_step = t
        s, y = t * d, g_t - g
        if float(s @ y) > 1e-12 * float(torch.linalg.vector_norm(s) * torch.linalg.vector_norm(y)):
            S.append(s)
            Y.append(y)
            if len(S) > settings.history:
                S.pop(0)
                Y.pop(0)
        x, J, g = x + s, J_t, g_t
        rel = float(torch.linalg.vector_norm(g)) / scale
        if float(torch.linalg.vector_norm(x)) > settings.basin_factor * start_norm:
            status = "left_basin"
            break
        if iterations % settings.check_every == 0:
            best.append(min(best[-1], rel))
            if len(best) > settings.stall_checks and best[-1] > 0.5 * best[-1 - settings.stall_checks]:
                status = "stalled"
                break
    converged = rel <= tol
    status = "converged" if converged else "diverged" if rel > 1.0 else status
    return x, {"relative_gradient_norm": rel, "iterations": iterations, "evaluations": evaluations,
               "converged": converged, "status": status}


def second_pbrf(problem: Problem, removed: Tensor, tol: float,
                settings: SecondSolveSettings = SecondSolveSettings(),
                precondition: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, dict]:
    """Solve J_m for every m in `removed` (K,) by L-BFGS, one at a time -> Δ (K, d), certificate.
    precondition: V (k, d) -> (G + μI)⁻¹V at θˢ, L-BFGS's H₀ (None: γI, see _lbfgs_one).

    Start: Δ⁰ = ε (G + μI)⁻¹ ∇ℓₘ(θˢ) by matrix-free CG (problem.gnvp) to start_rtol. The
    certificate has, per removed example, ‖∇J_m‖ / (ε‖∇ℓₘ(θˢ)‖), iterations and status
    (converged, max_iterations, stalled, left_basin, diverged) in the layout of responses.pbrf's."""
    t0 = time.perf_counter()
    p = problem
    mu = p.weight_decay + p.damping
    grads = p.train_gradients(removed)  # (K, d)
    B = p.epsilon * grads
    start, info = batched_cg(lambda V: p.gnvp(V) + mu * V, B, rtol=settings.start_rtol,
                             maxiter=settings.start_maxiter)
    scales = (p.epsilon * torch.linalg.vector_norm(grads, dim=-1)).tolist()
    objective = DirectPBRFObjective(p, mu)
    rows, Delta = [], []
    for k, m in enumerate(removed.tolist()):
        d, row = _lbfgs_one(objective, m, start[k], scales[k], tol, settings, precondition)
        log.info("second pbrf solve %d/%d (example %d): %s, relative gradient norm %.2e after %d iterations",
                 k + 1, len(removed), m, row["status"], row["relative_gradient_norm"], row["iterations"])
        rows.append(row)
        Delta.append(d)
    certificate = {
        "method": METHOD if precondition is None else METHOD_PRECONDITIONED,
        **{key: [r[key] for r in rows] for key in ("relative_gradient_norm", "iterations", "evaluations",
                                                   "converged", "status")},
        "steps": [r["iterations"] for r in rows],
        "tolerance": tol,
        "start_max_relative_residual": float(info.relative_residual.max()),
        "start_iterations": info.iterations,
        "settings": {k: v for k, v in settings.__dict__.items()},
        "seconds": time.perf_counter() - t0,
    }
    return torch.stack(Delta), certificate


def disagreement(first: np.ndarray, second: np.ndarray, trusted: np.ndarray, seed: int = 0) -> dict:
    """The error bar of a ground truth from two solves of the same K removed examples.

    first, second: scores (Q, K); trusted: (K,) bool, the examples both solves trust.
    relative_error[k] = ‖s₁[:, k] − s₂[:, k]‖ / ‖s₁[:, k]‖ over the queries (every k; median and
    max over the trusted ones); ceiling = mean over queries of the Pearson across the trusted
    examples between the two solves, with its 95 % bootstrap interval over examples (None with
    fewer than 3 trusted examples)."""
    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    trusted = np.asarray(trusted, dtype=bool)
    norm = np.linalg.norm(first, axis=0)
    rel = np.linalg.norm(first - second, axis=0) / np.where(norm > 0, norm, np.finfo(np.float64).tiny)
    out = {"n": int(first.shape[1]), "n_trusted": int(trusted.sum()), "relative_error": [float(v) for v in rel],
           "median_relative_error": None, "max_relative_error": None, "ceiling": None, "ceiling_ci": None}
    if trusted.any():
        out.update(median_relative_error=float(np.median(rel[trusted])), max_relative_error=float(rel[trusted].max()))
    if trusted.sum() >= 3:
        c = correlations(second[:, trusted], first[:, trusted], seed=seed)
        out.update(ceiling=c["pearson"], ceiling_ci=c["pearson_ci"])
    return out


def tie_margin(summary: dict | None) -> float:
    """How far below the best row a row may be and still be tied with it: 1 − the lower end of
    the ceiling's 95 % interval (the most a perfect estimator can lose to the noise of the ground
    truth); 0 without a ceiling (then only equal numbers tie)."""
    if not summary or not summary.get("ceiling_ci"):
        return 0.0
    return max(0.0, 1.0 - float(summary["ceiling_ci"][0]))


def error_bar_text(summary: dict | None) -> str:
    """'median 0.5 % / max 5.7 % rel. err., ceiling P 0.998 [0.75, 1.00]' (– parts where unknown)."""
    if not summary:
        return "–"
    pct = lambda v: "–" if v is None else f"{100 * v:.2g} %"
    ceiling = "–" if summary.get("ceiling") is None else f"{summary['ceiling']:.3f}"
    ci = summary.get("ceiling_ci")
    ceiling += f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
    return (f"median {pct(summary.get('median_relative_error'))} / max {pct(summary.get('max_relative_error'))} "
            f"rel. err., ceiling P {ceiling}")


__all__ = ["SecondSolveSettings", "PRECONDITIONED", "DirectPBRFObjective", "second_pbrf", "disagreement", "tie_margin", "error_bar_text",
           "METHOD", "VERSION"]
