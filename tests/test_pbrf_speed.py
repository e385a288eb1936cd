"""The PBRF solve's speed options give the same ground truth within its certificate.

A float32 dense factor inside the leave-one-out preconditioner, or float32 Gauss–Newton
products, only change the inner CG iterates: every row still converges to
‖∇J_m‖ ≤ tol·ε‖∇ℓₘ‖ in float64, so both solves reach the same local minimiser, to within
(‖∇J₃₂‖ + ‖∇J₆₄‖) / λ_min(∇²J_m) of each other.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmark.ground_truth import _LazyCurvature, response_fingerprint, solver_settings
from benchmark.linalg import CholeskySolver
from benchmark.responses import DampedGaussNewton, SolverSettings, linearized_pbrf, pbrf
from tasks import get_task

REMOVED = torch.tensor([1, 6, 13])


@pytest.mark.parametrize("field", ["preconditioner_dtype", "gauss_newton_dtype"])
def test_float32_inner_solve_gives_the_same_pbrf(mlp, field):
    """A float32 preconditioner factor (preconditioner_dtype) or float32 Gauss–Newton products
    (gauss_newton_dtype) in the inner CG only change the search directions: the objective, its
    gradient and the stopping test stay float64, so the solve reaches the float64 minimiser."""
    problem = mlp((5, 6, 4), "tanh", n_train=60, weight_decay=5e-2, train_steps=30)
    settings = SolverSettings(pbrf_tol=1e-10)
    mu = problem.weight_decay + problem.damping
    reference, ref_cert = pbrf(problem, REMOVED, DampedGaussNewton(problem, mu, settings))
    low = dataclasses.replace(settings, **{field: "float32"})
    Delta, cert = pbrf(problem, REMOVED, DampedGaussNewton(problem, mu, low))
    assert all(ref_cert["converged"]) and all(cert["converged"]), (ref_cert, cert)
    assert Delta.dtype == torch.float64
    # the certificate's bound: ‖Δ₃₂ − Δ₆₄‖ ≤ (‖∇J₃₂‖ + ‖∇J₆₄‖) / μ with μ ≤ λ_min of J_m's Hessian
    # near the minimiser on this smooth net (checked: both rows converge with every step accepted)
    scale = problem.epsilon * problem.train_gradients(REMOVED).norm(dim=1)
    bound = (torch.tensor(cert["relative_gradient_norm"]) + torch.tensor(ref_cert["relative_gradient_norm"])) \
        * scale / mu
    assert ((Delta - reference).norm(dim=1) <= bound).all()
    assert ((Delta - reference).norm(dim=1) <= 1e-6 * reference.norm(dim=1)).all()
    assert (reference.norm(dim=1) > 0).all()


def test_nystrom_preconditioned_cg_gives_the_same_ground_truth(mlp):
    """nystrom_rank (the CG path, d > dense_max_params) preconditions the linearized response's
    CG and the PBRF's inner CG by the Nyström approximation of G + μI from float32 products:
    the same linearized response to its residual tolerance and the same PBRF minimiser within
    the certificate's bound, in fewer than half the inner iterations of unpreconditioned CG."""
    problem = mlp((5, 6, 4), "tanh", n_train=60, weight_decay=5e-2, train_steps=30)  # d = 64
    plain = SolverSettings(pbrf_tol=1e-10, dense_max_params=0)
    nystrom = dataclasses.replace(plain, nystrom_rank=32)
    curvature, plain_curvature = _LazyCurvature(problem, nystrom)(), _LazyCurvature(problem, plain)()
    assert curvature.method == "pcg (rank-32 Nyström, float32 products)" and plain_curvature.method == "cg"
    X, info = linearized_pbrf(problem, REMOVED, curvature)
    X_plain, plain_info = linearized_pbrf(problem, REMOVED, plain_curvature)
    assert info["max_relative_residual"] <= 1e-10 and rel_diff(X, X_plain) < 1e-8
    assert info["iterations"] < plain_info["iterations"] / 2
    reference, ref_cert = pbrf(problem, REMOVED, plain_curvature)
    Delta, cert = pbrf(problem, REMOVED, curvature)
    assert ref_cert["preconditioner"] == "none"
    assert cert["preconditioner"] == "Nyström approximation of G + μI (pcg (rank-32 Nyström, float32 products))"
    assert all(ref_cert["converged"]) and all(cert["converged"]), (ref_cert, cert)
    assert cert["inner_iterations"] < ref_cert["inner_iterations"] / 2
    mu = problem.weight_decay + problem.damping
    scale = problem.epsilon * problem.train_gradients(REMOVED).norm(dim=1)
    bound = (torch.tensor(cert["relative_gradient_norm"]) + torch.tensor(ref_cert["relative_gradient_norm"])) \
        * scale / mu  # as in test_float32_inner_solve_gives_the_same_pbrf
    assert ((Delta - reference).norm(dim=1) <= bound).all() and rel_diff(Delta, reference) < 1e-6


def test_nystrom_rank_keys_the_linear_and_pbrf_responses():
    """nystrom_rank unset stays out of every key; set (ae-mnist), it keys the linearized
    response and the PBRF, whose solves it steers, and not the retrainings."""
    task, mlp_task = get_task("ae-mnist"), get_task("mlp-mnist")
    settings = solver_settings(task, "cpu")
    assert settings.nystrom_rank == 400 and settings.dense_max_params < 14124  # tasks/autoencoder.py
    for response in ("linear", "pbrf"):
        assert response_fingerprint(task, "cpu", response, settings)["solver"]["nystrom_rank"] == 400
        assert response_fingerprint(task, "cpu", response, settings)["ground_truth"]["nystrom_rank"] == 400
        unset = response_fingerprint(mlp_task, "cpu", response, solver_settings(mlp_task, "cpu"))
        assert "nystrom_rank" not in unset["solver"] and "nystrom_rank" not in unset["ground_truth"]
    unset = dataclasses.replace(settings, nystrom_rank=None)
    assert response_fingerprint(task, "cpu", "cold", settings)["solver"] == \
        response_fingerprint(task, "cpu", "cold", unset)["solver"]
    assert "nystrom_rank" not in response_fingerprint(task, "cpu", "cold", settings)["ground_truth"]


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_lowered_problem_products_are_rounded_float64_ones(mlp):
    """Problem.lowered(float32): the same Gauss–Newton products to float32 rounding (not bitwise:
    it is a copy in the other dtype), sharing the counter and leaving the problem untouched."""
    problem = mlp((5, 6, 4), "tanh", n_train=60, weight_decay=5e-2, train_steps=30)
    before = problem.params.clone()
    low = problem.lowered(torch.float32)
    assert low.params.dtype == low.train.inputs.dtype == torch.float32
    assert problem.params.dtype == problem.train.inputs.dtype == torch.float64
    V = torch.randn(3, problem.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = problem.gnvp(V)
    rounded = low.gnvp(V.float()).double()
    err = float((rounded - exact).norm() / exact.norm())
    assert 1e-10 < err < 1e-5
    assert low.counter is problem.counter and problem.counter.counts["gnvp"] == 2 * 3 * problem.n_train
    assert torch.equal(problem.params, before)


def test_lowered_factor_is_an_approximate_inverse():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(40, 40, dtype=torch.float64, generator=g)
    A = M @ M.T + 40 * torch.eye(40, dtype=torch.float64)
    B = torch.randn(3, 40, dtype=torch.float64, generator=g)
    exact = CholeskySolver(A).solve(B)
    low = CholeskySolver(A).lowered(torch.float32).solve(B)
    assert low.dtype == torch.float64
    err = float((low - exact).norm() / exact.norm())
    assert 1e-10 < err < 1e-5  # float32 rounding: not exact, but close


def test_default_settings_keep_the_cache_key():
    """preconditioner_dtype unset is left out of the ground truth's cache key (keys from
    before the field existed stay valid); set, it changes the key."""
    task = get_task("mlp-mnist")
    settings = solver_settings(task, "smoke")
    key = response_fingerprint(task, "smoke", "pbrf", settings)
    assert "preconditioner_dtype" not in key["solver"]
    low = response_fingerprint(task, "smoke", "pbrf", dataclasses.replace(settings, preconditioner_dtype="float32"))
    assert low["solver"]["preconditioner_dtype"] == "float32"


def test_task_preconditioner_dtype_keys_the_pbrf_only():
    """A task's GroundTruthConfig.preconditioner_dtype reaches the PBRF solve and its cache key
    (and so the second solve's, through "first"), and no other response's: the linearized PBRF
    and the retrainings never use the preconditioner, so their cached values stay valid."""
    task = get_task("mlp-mnist")
    settings = solver_settings(task, "cpu")
    assert settings.preconditioner_dtype == "float32"
    pbrf_key = response_fingerprint(task, "cpu", "pbrf", settings)
    assert pbrf_key["solver"]["preconditioner_dtype"] == "float32"
    assert pbrf_key["ground_truth"]["preconditioner_dtype"] == "float32"
    for other in ("linear", "cold", "pbrf-epochs"):
        key = response_fingerprint(task, "cpu", other, settings)
        assert "preconditioner_dtype" not in key["solver"] and "preconditioner_dtype" not in key["ground_truth"]
    assert solver_settings(get_task("transformer-ptb"), "cpu").gauss_newton_dtype == "float32"  # tasks/transformer.py
    for field in ("preconditioner_dtype", "gauss_newton_dtype"):  # unset: no key, set: the PBRF's key only
        assert field not in response_fingerprint(task, "smoke", "pbrf", solver_settings(task, "smoke"))["solver"]
        low = dataclasses.replace(settings, **{field: "float32"})
        assert response_fingerprint(task, "cpu", "pbrf", low)["solver"][field] == "float32"
        assert response_fingerprint(task, "cpu", "cold", low) == response_fingerprint(task, "cpu", "cold", settings)
    float64 = dataclasses.replace(settings, preconditioner_dtype=None)
    assert response_fingerprint(task, "cpu", "linear", float64) == response_fingerprint(task, "cpu", "linear", settings)
    assert response_fingerprint(task, "cpu", "pbrf-check", float64) != \
        response_fingerprint(task, "cpu", "pbrf-check", settings)


def test_cg_recursive_residual_same_iterates():
    """true_residual=False returns the same X and iterations, and a residual that matches the
    true one to rounding (well-conditioned system)."""
    from benchmark.linalg import batched_cg, relative_residual
    g = torch.Generator().manual_seed(1)
    M = torch.randn(30, 30, dtype=torch.float64, generator=g)
    A = M @ M.T + 5 * torch.eye(30, dtype=torch.float64)
    B = torch.randn(4, 30, dtype=torch.float64, generator=g)
    X1, i1 = batched_cg(lambda X: X @ A, B, rtol=1e-6, maxiter=100)
    X2, i2 = batched_cg(lambda X: X @ A, B, rtol=1e-6, maxiter=100, true_residual=False)
    assert torch.equal(X1, X2) and i1.iterations == i2.iterations
    torch.testing.assert_close(i2.relative_residual, relative_residual(lambda X: X @ A, X2, B), rtol=1e-6, atol=1e-12)
    assert float(i2.relative_residual.max()) <= 1e-6


def test_batched_rows_solve_alone_and_stop_costing_when_done(mlp):
    """The batched solve computes only the active rows: each row agrees with its solve alone
    within the certificates' bound, and a row that converges early stops adding evaluations
    (the batch costs less than its longest row's steps times R)."""
    problem = mlp((5, 6, 4), "tanh", n_train=60, weight_decay=5e-2, train_steps=30)
    mu = problem.weight_decay + problem.damping
    curvature = DampedGaussNewton(problem, mu, SolverSettings(pbrf_tol=1e-10))
    problem.counter.reset()
    batched, cert = pbrf(problem, REMOVED, curvature)
    batched_gradients = problem.counter.counts["gradient"]
    assert all(cert["converged"]) and len(set(cert["steps"])) > 1, cert["steps"]
    scale = problem.epsilon * problem.train_gradients(REMOVED).norm(dim=1)
    for r in range(len(REMOVED)):
        problem.counter.reset()
        alone, alone_cert = pbrf(problem, REMOVED[r:r + 1], curvature)
        assert alone_cert["converged"] == [True]
        bound = (cert["relative_gradient_norm"][r] + alone_cert["relative_gradient_norm"][0]) * scale[r] / mu
        assert float((batched[r] - alone[0]).norm()) <= float(bound)
    # every step evaluates J at least twice per active row (CG start, line search): with all
    # rows kept to the end it would be at least (N + 1) · R · (max steps + 1)
    assert batched_gradients < (problem.n_train + 1) * len(REMOVED) * (max(cert["steps"]) + 1)
