"""The built-in estimators agree with each other on small well-conditioned problems, and the
metrics give the known answers on known inputs.

Problems: a tiny tanh MLP classifier (damping 0.1) and logistic regression (damping 0.1), both
float64 and built in conftest.py / here. `exact` is the reference; `cg` with enough iterations
must match it to 1e-6, `lissa` with enough depth and the full batch to 1e-2, and `grad-dot` is
ε ∇ℓ_qᵀ∇ℓₘ computed here with plain autograd.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from benchmark.metrics import average_ranks, correlations, output_distance
from benchmark.problem import Batch, FunctionalModel, Problem
from benchmark.training import lbfgs
from tasks.base import Recipe
from estimators import CG, REGISTRY, Exact, GradDot, LiSSA, ParameterEstimator, make_estimator

REMOVED = torch.tensor([0, 5, 9, 17, 29])


def bce(out, t):
    return F.binary_cross_entropy_with_logits(out[:, 0], t, reduction="none")


def logistic_problem(n_train: int = 30, p: int = 4, damping: float = 0.1, wd: float = 1e-2) -> Problem:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n_train, p, generator=g, dtype=torch.float64)
    w = torch.randn(p, generator=g, dtype=torch.float64)
    y = (torch.rand(n_train, generator=g, dtype=torch.float64) < torch.sigmoid(X @ w)).double()
    Xq = torch.randn(6, p, generator=g, dtype=torch.float64)
    yq = (torch.rand(6, generator=g, dtype=torch.float64) < torch.sigmoid(Xq @ w)).double()
    torch.manual_seed(0)
    model = FunctionalModel(nn.Linear(p, 1).double())
    theta = lbfgs(model, bce, Batch(X, y), model.flatten(), Recipe("lbfgs", epochs=50, weight_decay=wd))
    return Problem(task="logistic", scale="smoke", model=model, params=theta, train=Batch(X, y),
                   query=Batch(Xq, yq), loss=bce, damping=damping, weight_decay=wd, seed=0)


@pytest.fixture(scope="module", params=["mlp", "logistic"])
def problem_factory(request, mlp):
    if request.param == "mlp":
        return lambda: mlp((4, 6, 3), "tanh", n_train=30, damping=0.1, train_steps=20)
    return logistic_problem


@pytest.fixture
def problem(problem_factory):
    return problem_factory()


@pytest.fixture
def exact(problem):
    est = Exact().fit(problem)
    return est, est.parameter_change(REMOVED), est.scores(REMOVED, problem.query)


def autograd_gradients(problem: Problem, batch: Batch) -> torch.Tensor:
    out = []
    for x, t in zip(batch.inputs, batch.targets):
        th = problem.params.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(problem.loss(problem.model(th, x[None]), t[None])[0], th)
        out.append(g)
    return torch.stack(out)


def rel_err(a, b) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def test_exact_is_damped_gauss_newton_solve(problem, exact):
    est, delta, S = exact
    assert est.solver_ == "pcg (float32 factor)"
    G = problem.gauss_newton_matrix()
    mu = problem.weight_decay + problem.damping
    grads = autograd_gradients(problem, problem.train.subset(REMOVED))
    expected = problem.epsilon * torch.linalg.solve(G + mu * torch.eye(problem.n_params, dtype=G.dtype), grads.T).T
    assert delta.shape == (len(REMOVED), problem.n_params)
    assert rel_err(delta, expected) < 1e-9
    gq = autograd_gradients(problem, problem.query)
    assert S.shape == (len(problem.query), len(REMOVED))
    assert rel_err(S, gq @ expected.T) < 1e-9
    # every path of the same estimator, the float32 ones certified by float64 residuals
    d = problem.n_params
    for kwargs, path in (({"inner_dtype": None}, "dense"),
                         ({"dense_max_params": 0}, f"pcg (rank-{d} Nyström, float32 products)"),
                         ({"dense_max_params": 0, "nystrom_rank": 3}, "pcg (rank-3 Nyström, float32 products)"),
                         ({"dense_max_params": 0, "nystrom_rank": 0}, "cg")):
        other = Exact(rtol=1e-13, **kwargs).fit(problem)
        assert other.solver_ == path
        assert rel_err(other.parameter_change(REMOVED), expected) < 1e-9
    # the flop bound: forming G costs N·C·d²; one flop below it the dense path, at it CG
    C = problem.outputs(problem.train.inputs[:1]).numel()
    flops = problem.n_train * C * problem.n_params ** 2
    assert Exact(dense_max_flops=flops, inner_dtype=None).fit(problem).solver_ == "dense"
    by_flops = Exact(dense_max_flops=flops - 1, rtol=1e-13, nystrom_rank=0).fit(problem)
    assert by_flops.solver_ == "cg" and rel_err(by_flops.parameter_change(REMOVED), delta) < 1e-9
    with pytest.raises(ValueError, match="inner_dtype='int8' is not a floating torch dtype"):
        Exact(inner_dtype="int8").fit(problem)


def test_exact_own_damping(problem):
    est = Exact(damping=1e-2).fit(problem)
    G = problem.gauss_newton_matrix()
    grads = problem.train_gradients(REMOVED)
    mu = problem.weight_decay + 1e-2
    expected = problem.epsilon * torch.linalg.solve(G + mu * torch.eye(problem.n_params, dtype=G.dtype), grads.T).T
    assert rel_err(est.parameter_change(REMOVED), expected) < 1e-10
    assert make_estimator("exact-damp1e-2").get_params()["damping"] == 1e-2


def test_cg_agrees_with_exact(problem, exact):
    _, delta, S = exact
    est = CG(maxiter=500, rtol=1e-12).fit(problem)
    d = est.parameter_change(REMOVED)
    assert rel_err(d, delta) < 1e-6
    assert rel_err(est.scores(REMOVED, problem.query), S) < 1e-6
    assert est.info_.converged


def test_truncated_cg_is_not_exact(problem, exact):
    """A 2-iteration CG is visibly off: the agreement above is not vacuous."""
    _, delta, _ = exact
    d = CG(maxiter=2, rtol=1e-12).fit(problem).parameter_change(REMOVED)
    assert rel_err(d, delta) > 1e-4


def test_lissa_agrees_with_exact(problem, exact):
    """Full batch (batch_size ≥ N) and depth 300: the Neumann recursion with the exact G, whose
    truncation error is (1 − (λ_min + μ)/s)^300 < 1e-3 here."""
    _, delta, S = exact
    est = LiSSA(depth=300, batch_size=problem.n_train).fit(problem)
    mu = problem.weight_decay + problem.damping
    assert (1 - mu / est.scale_) ** 300 < 1e-3
    d = est.parameter_change(REMOVED)
    assert rel_err(d, delta) <= 1e-2
    assert rel_err(est.scores(REMOVED, problem.query), S) <= 1e-2


def test_lissa_scale_and_divergence(problem):
    est = LiSSA(depth=5).fit(problem)
    lam_max = float(torch.linalg.eigvalsh(problem.gauss_newton_matrix()).max())
    mu = problem.weight_decay + problem.damping
    assert est.scale_ == pytest.approx(2 * (lam_max + mu), rel=1e-3)
    with pytest.raises(FloatingPointError, match="scale"):
        LiSSA(depth=300, scale=lam_max / 50, batch_size=problem.n_train).fit(problem).parameter_change(REMOVED)


def test_grad_dot(problem):
    est = GradDot().fit(problem)
    assert not isinstance(est, ParameterEstimator)
    S = est.scores(REMOVED, problem.query)
    g_train = autograd_gradients(problem, problem.train.subset(REMOVED))
    g_query = autograd_gradients(problem, problem.query)
    torch.testing.assert_close(S, problem.epsilon * g_query @ g_train.T, rtol=1e-10, atol=1e-15)


def test_all_registered_estimators_agree_in_sign(problem, exact):
    """Every registered estimator gives finite (Q, R) scores positively correlated with exact."""
    _, _, S = exact
    for name in REGISTRY:
        est = make_estimator(name, **({"depth": 100} if name.startswith("lissa") else {}))
        out = est.fit(problem).scores(REMOVED, problem.query)
        assert out.shape == S.shape and bool(torch.isfinite(out).all()), name
        assert correlations(out.numpy(), S.numpy(), n_boot=10)["pearson_pooled"] > 0.5, name


def test_estimators_leave_problem_unchanged(problem):
    before = problem.params.clone()
    for est in (Exact(), CG(maxiter=5), LiSSA(depth=5), GradDot()):
        est.fit(problem).scores(REMOVED, problem.query)
    assert torch.equal(problem.params, before)


# ---------------------------------------------------------------- metrics


@pytest.fixture
def truth():
    return np.random.default_rng(0).normal(size=(4, 12))


def test_correlations_perfect(truth):
    for pred in (truth, 3.0 * truth + 1.0):
        c = correlations(pred, truth, n_boot=200)
        for k in ("pearson", "spearman", "pearson_pooled", "spearman_pooled"):
            assert c[k] == pytest.approx(1.0, abs=1e-12), k
        assert c["pearson_ci"][0] == pytest.approx(1.0, abs=1e-12)


def test_correlations_reversed(truth):
    c = correlations(-truth, truth, n_boot=200)
    for k in ("pearson", "spearman", "pearson_pooled", "spearman_pooled"):
        assert c[k] == pytest.approx(-1.0, abs=1e-12), k


def test_correlations_monotone_nonlinear(truth):
    c = correlations(np.exp(3 * truth), truth, n_boot=50)
    assert c["spearman"] == pytest.approx(1.0, abs=1e-12)
    assert c["pearson"] < 0.99


def test_correlations_with_a_constant_are_undefined(truth):
    """A constant prediction ranks nothing: its correlations are undefined (None), counted, not 0."""
    c = correlations(np.zeros_like(truth), truth, n_boot=200)
    for k in ("pearson", "spearman", "pearson_pooled", "spearman_pooled", "pearson_ci", "spearman_ci"):
        assert c[k] is None, k
    assert c["pearson_undefined"] == c["spearman_undefined"] == truth.shape[0]
    # constant per query only: each query is undefined, the pooled number still sees the offsets
    rows = np.repeat(np.arange(4.0)[:, None], 12, axis=1)
    c = correlations(rows, truth, n_boot=10)
    assert c["pearson"] is None and c["pearson_undefined"] == 4 and c["pearson_pooled"] is not None
    # a constant up to float rounding is constant too (the mean of R copies of 0.1 is not 0.1)
    assert correlations(np.full_like(truth, 0.1), truth, n_boot=10)["pearson"] is None


def test_undefined_queries_are_left_out_of_the_mean(truth):
    """One query with constant truth: the mean is over the other queries, and it is counted."""
    t = truth.copy()
    t[1] = 0.5
    pred = t + 0.1 * np.random.default_rng(2).normal(size=t.shape)
    c = correlations(pred, t, n_boot=50)
    others = [stats.pearsonr(pred[q], t[q])[0] for q in (0, 2, 3)]
    assert c["pearson_undefined"] == 1
    assert c["pearson"] == pytest.approx(np.mean(others), abs=1e-12)
    lo, hi = c["pearson_ci"]
    assert lo <= c["pearson"] <= hi


def test_correlations_match_scipy(truth):
    pred = truth + np.random.default_rng(1).normal(size=truth.shape)
    c = correlations(pred, truth, n_boot=500, seed=3)
    assert c["pearson"] == pytest.approx(np.mean([stats.pearsonr(p, t)[0] for p, t in zip(pred, truth)]), abs=1e-12)
    assert c["spearman"] == pytest.approx(np.mean([stats.spearmanr(p, t)[0] for p, t in zip(pred, truth)]),
                                          abs=1e-12)
    assert c["pearson_pooled"] == pytest.approx(stats.pearsonr(pred.ravel(), truth.ravel())[0], abs=1e-12)
    assert c["spearman_pooled"] == pytest.approx(stats.spearmanr(pred.ravel(), truth.ravel())[0], abs=1e-12)
    for name in ("pearson", "spearman"):
        lo, hi = c[f"{name}_ci"]
        assert -1 <= lo <= c[name] <= hi <= 1, (name, lo, c[name], hi)
        assert hi - lo > 1e-3  # a real interval
    # deterministic given the seed
    assert correlations(pred, truth, n_boot=500, seed=3) == c


def test_average_ranks_match_scipy():
    """Spearman's ranks without scipy: ties share the mean of their ranks, a NaN voids its slice."""
    rng = np.random.default_rng(4)
    for shape in [(1,), (9,), (3, 7), (50, 4, 40)]:
        ties = rng.integers(0, 3, size=shape).astype(float)
        distinct = rng.normal(size=shape)
        for a in (ties, distinct, np.where(ties == 0, np.inf, distinct)):
            np.testing.assert_array_equal(average_ranks(a), stats.rankdata(a, axis=-1))
    a = rng.normal(size=(3, 5))
    a[1, 2] = np.nan
    np.testing.assert_array_equal(average_ranks(a), stats.rankdata(a, axis=-1))
    assert np.isnan(average_ranks(a)[1]).all() and np.isfinite(average_ranks(a)[[0, 2]]).all()


def test_correlations_shape_mismatch(truth):
    with pytest.raises(ValueError, match="shape"):
        correlations(truth[:, :5], truth)


def test_output_distance_known():
    a = np.zeros((2, 3, 2))
    b = np.array([[3.0, 4.0], [0.0, 0.0], [6.0, 8.0]])  # (n_eval, C), broadcast over R
    np.testing.assert_allclose(output_distance(a, b), [5.0, 5.0])
    a[1] = b
    np.testing.assert_allclose(output_distance(a, b), [5.0, 0.0])
    # (R, n_eval, C) against (1, n_eval, C); and a single output dimension
    np.testing.assert_allclose(output_distance(np.ones((1, 4, 1)), -np.ones((1, 4, 1))), [2.0])
    assert output_distance(b[None], b[None]).tolist() == [0.0]
