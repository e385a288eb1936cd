"""Ridge regression, where every response function has a closed form (DESIGN.md §1).

Linear model f(θ, x) = θᵀx, loss ℓᵢ = ½(θᵀxᵢ − tᵢ)², θˢ the exact minimiser of
(1/N) Σ ℓᵢ + (wd/2)‖θ‖², ε = 1/N, μ = wd + λ, A = XᵀX/N + μI, rₘ = θˢᵀxₘ − tₘ, ∇ℓₘ = xₘ rₘ.

- linearized PBRF:  Δ_lin  = ε A⁻¹ xₘ rₘ.
- PBRF: D_L is ½‖y − yˢ‖² and the model is linear, so J_m is an exact quadratic,
  J_m(Δ) = ½ Δᵀ(A − ε xₘxₘᵀ)Δ − ε rₘ xₘᵀΔ + const, minimised at
        Δ_pbrf = ε (A − ε xₘxₘᵀ)⁻¹ xₘ rₘ = Δ_lin / (1 − ε hₘ),   hₘ = xₘᵀ A⁻¹ xₘ
  (Sherman–Morrison). The PBRF keeps ℓₘ's own curvature (−ε xₘxₘᵀ), the linearization drops
  it, so the two differ by the scalar factor 1/(1 − ε hₘ) = 1 + O(1/N): they are parallel, not
  equal.
- With λ → 0, the PBRF minimiser is exactly the leave-one-out minimiser of
  (1/N) Σ_{i≠m} ℓᵢ + (wd/2)‖θ‖² minus θˢ. This holds only because weight decay enters the PBRF
  through its Bregman divergence (wd/2)‖θ − θˢ‖² (the curvature G + (wd+λ)I); it pins that
  reading.
- Sign: removing m moves θ by +ε A⁻¹∇ℓₘ and raises ℓₘ; the score of m on itself is positive.

Both paths of DampedGaussNewton are checked: dense (Cholesky) and CG (dense_max_params=0).
"""
from __future__ import annotations

import pytest
import torch

from benchmark.problem import Batch
from benchmark.responses import DampedGaussNewton, SolverSettings, linearized_pbrf, pbrf
from estimators import Exact

PATHS = {"dense": 16384, "cg": 0}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max over rows of ‖a − b‖ / ‖b‖."""
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return float((torch.linalg.vector_norm(a - b, dim=-1) / torch.linalg.vector_norm(b, dim=-1)).max())


def settings(path: str) -> SolverSettings:
    return SolverSettings(dense_max_params=PATHS[path], linear_rtol=1e-14, pbrf_tol=1e-12)


def closed_linear(r, removed, lam=None) -> torch.Tensor:
    """Δ_lin = ε A⁻¹ xₘ rₘ for every m -> (R, p)."""
    B = r.X[removed] * r.residual(removed)[:, None] / r.N
    return torch.linalg.solve(r.A(lam), B.T).T


def closed_pbrf(r, removed, lam=None) -> torch.Tensor:
    """Δ_pbrf = ε (A − ε xₘxₘᵀ)⁻¹ xₘ rₘ for every m -> (R, p)."""
    out = []
    for m in removed.tolist():
        x = r.X[m]
        out.append(torch.linalg.solve(r.A(lam) - torch.outer(x, x) / r.N, x * r.residual(m) / r.N))
    return torch.stack(out)


def leave_one_out(r, removed) -> torch.Tensor:
    """θ₋ₘ − θˢ, θ₋ₘ = argmin (1/N) Σ_{i≠m} ℓᵢ + (wd/2)‖θ‖² (solved directly) -> (R, p)."""
    p = r.X.shape[1]
    out = []
    for m in removed.tolist():
        keep = torch.arange(r.N) != m
        Xk, tk = r.X[keep], r.t[keep]
        theta_m = torch.linalg.solve(Xk.T @ Xk / r.N + r.wd * torch.eye(p, dtype=r.X.dtype), Xk.T @ tk / r.N)
        out.append(theta_m - r.theta)
    return torch.stack(out)


def leverage(r, removed, lam=None) -> torch.Tensor:
    """ε hₘ = ε xₘᵀ A⁻¹ xₘ -> (R,)."""
    x = r.X[removed]
    return (x * torch.linalg.solve(r.A(lam), x.T).T).sum(1) / r.N


REMOVED = torch.tensor([0, 3, 7, 12, 20, 31, 39])


def test_base_point_is_stationary(ridge):
    """θˢ (closed form) is a stationary point of the training objective, so the PBRF is too."""
    r = ridge()
    p = r.problem
    g = p.gradients(p.train).mean(0) + r.wd * r.theta
    assert float(g.norm()) < 1e-13
    # the problem's operators see the linear model: G = XᵀX/N exactly
    G = p.gauss_newton_matrix()
    torch.testing.assert_close(G, r.X.T @ r.X / r.N, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("path", list(PATHS))
def test_linearized_pbrf_is_closed_form(ridge, path):
    r = ridge()
    curvature = DampedGaussNewton(r.problem, r.wd + r.lam, settings(path))
    assert curvature.method == path
    Delta, cert = linearized_pbrf(r.problem, REMOVED, curvature)
    assert Delta.shape == (len(REMOVED), 5)
    assert rel_err(Delta, closed_linear(r, REMOVED)) < 1e-8
    assert cert["max_relative_residual"] < 1e-10
    assert cert["method"] == path


@pytest.mark.parametrize("path", list(PATHS))
def test_pbrf_is_exact_quadratic_minimiser(ridge, path):
    r = ridge()
    curvature = DampedGaussNewton(r.problem, r.wd + r.lam, settings(path))
    Delta, cert = pbrf(r.problem, REMOVED, curvature)
    assert all(cert["converged"]), cert
    assert rel_err(Delta, closed_pbrf(r, REMOVED)) < 1e-8


@pytest.mark.parametrize("path", list(PATHS))
def test_pbrf_and_linear_differ_by_sherman_morrison_factor(ridge, path):
    """Δ_pbrf = Δ_lin / (1 − ε hₘ): parallel, equal to first order in ε, not exactly equal."""
    r = ridge()
    curvature = DampedGaussNewton(r.problem, r.wd + r.lam, settings(path))
    lin, _ = linearized_pbrf(r.problem, REMOVED, curvature)
    full, _ = pbrf(r.problem, REMOVED, curvature)
    factor = 1.0 / (1.0 - leverage(r, REMOVED))
    assert rel_err(full, lin * factor[:, None]) < 1e-8
    assert rel_err(full, closed_linear(r, REMOVED) * factor[:, None]) < 1e-8
    # ε hₘ > 0 is O(p/N) (its sum over all m is tr((A)⁻¹XᵀX/N) < p): the two response functions
    # agree to first order in ε only, and here differ by far more than 1e-8
    assert float(leverage(r, torch.arange(r.N)).sum()) < 5
    assert float((factor - 1).min()) > 1e-2
    assert rel_err(lin, full) > 1e-2


@pytest.mark.parametrize("path", list(PATHS))
def test_vanishing_damping_is_leave_one_out(ridge, path):
    """λ → 0: the PBRF is exact leave-one-out retraining (weight decay through its Bregman
    divergence), and the linearized PBRF is its first-order (leverage-corrected) version."""
    lam = 1e-12
    r = ridge(lam=lam)
    loo = leave_one_out(r, REMOVED)
    # closed forms
    assert rel_err(closed_pbrf(r, REMOVED), loo) < 1e-8
    factor = 1.0 / (1.0 - leverage(r, REMOVED))
    assert rel_err(closed_linear(r, REMOVED) * factor[:, None], loo) < 1e-8
    # the library's solvers
    curvature = DampedGaussNewton(r.problem, r.wd + lam, settings(path))
    full, cert = pbrf(r.problem, REMOVED, curvature)
    assert all(cert["converged"]), cert
    assert rel_err(full, loo) < 1e-8
    lin, _ = linearized_pbrf(r.problem, REMOVED, curvature)
    assert rel_err(lin * factor[:, None], loo) < 1e-8


def test_weight_decay_reading_matters(ridge):
    """The alternative reading (curvature G + λI, weight decay not in the Bregman term) misses
    leave-one-out retraining by far more than the tolerance above: the test has teeth."""
    r = ridge(lam=1e-12, wd=0.5)
    loo = leave_one_out(r, REMOVED)
    wrong = []
    for m in REMOVED.tolist():
        x = r.X[m]
        A_wrong = r.X.T @ r.X / r.N + 1e-12 * torch.eye(5, dtype=x.dtype) - torch.outer(x, x) / r.N
        wrong.append(torch.linalg.solve(A_wrong, x * r.residual(m) / r.N))
    assert rel_err(torch.stack(wrong), loo) > 1e-2
    assert rel_err(closed_pbrf(r, REMOVED), loo) < 1e-8


@pytest.mark.parametrize("path", list(PATHS))
def test_sign_removing_raises_own_loss(ridge, path):
    r = ridge()
    curvature = DampedGaussNewton(r.problem, r.wd + r.lam, settings(path))
    lin, _ = linearized_pbrf(r.problem, REMOVED, curvature)
    full, _ = pbrf(r.problem, REMOVED, curvature)
    loo = leave_one_out(r, REMOVED)
    for k, m in enumerate(REMOVED.tolist()):
        base = r.loss(r.theta, m)
        assert r.loss(r.theta + lin[k], m) > base
        assert r.loss(r.theta + full[k], m) > base
        assert r.loss(r.theta + loo[k], m) > base
        # Δ points along +∇ℓₘ (positive inner product)
        assert float(lin[k] @ (r.X[m] * r.residual(m))) > 0


#: Exact's solve paths: (dense_max_params, inner_dtype, nystrom_rank) -> solver_
EXACT_PATHS = {"pcg (float32 factor)": (16384, "float32", 400), "dense": (16384, None, 400),
               "pcg (rank-3 Nyström, float32 products)": (0, "float32", 3), "cg": (0, None, 0)}


@pytest.mark.parametrize("path", list(EXACT_PATHS))
def test_exact_estimator_sign_and_value(ridge, path):
    r = ridge()
    max_params, inner, rank = EXACT_PATHS[path]
    est = Exact(dense_max_params=max_params, rtol=1e-14, inner_dtype=inner, nystrom_rank=rank).fit(r.problem)
    assert est.solver_ == path
    delta = est.parameter_change(REMOVED)
    assert rel_err(delta, closed_linear(r, REMOVED)) < 1e-8
    # self-influence: query = the removed examples themselves -> positive diagonal
    own = Batch(r.X[REMOVED], r.t[REMOVED][:, None])
    S = est.scores(REMOVED, own)
    assert S.shape == (len(REMOVED), len(REMOVED))
    assert bool((torch.diagonal(S) > 0).all()), torch.diagonal(S)
    # S[q, m] = ∇ℓ_qᵀ Δ_m with ∇ℓ_q = x_q r_q
    grads = r.X[REMOVED] * r.residual(REMOVED)[:, None]
    torch.testing.assert_close(S, grads @ closed_linear(r, REMOVED).T, rtol=1e-8, atol=1e-14)
    # and the score on the problem's own query set
    xq, tq = r.problem.query.inputs, r.problem.query.targets[:, 0]
    gq = xq * (xq @ r.theta - tq)[:, None]
    torch.testing.assert_close(est.scores(REMOVED, r.problem.query), gq @ closed_linear(r, REMOVED).T,
                               rtol=1e-8, atol=1e-14)
    # the true loss change of m itself under leave-one-out retraining has the same sign
    loo = leave_one_out(r, REMOVED)
    true = torch.stack([r.loss(r.theta + loo[k], m) - r.loss(r.theta, m) for k, m in enumerate(REMOVED.tolist())])
    assert bool((true > 0).all())
