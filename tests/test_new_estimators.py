"""Exactness of the estimators arnoldi, trak, grad-cos and datainf, and LiSSA's depth rule.

Each estimator is compared in the case where it is exact with a dense float64 reference built
here from the problem's own gradients and Gauss-Newton matrix, with μ = wd + λ written out, so
that a flipped sign, a missing ε or 1/N, or a damping without wd fails (checked by planting each
of these in the estimators while writing the tests).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmark.problem import Problem
from estimators import REGISTRY, TRAK, Arnoldi, DataInf, Exact, GradCos, LiSSA, make_estimator
from estimators.checks import mlp_problem, removed_examples
from estimators.datainf import layer_blocks
from estimators.lissa import lissa_depth


def rel_err(a, b) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.fixture(scope="module")
def problem() -> Problem:
    return mlp_problem()  # tanh MLP, d = 51, N = 48, wd = 1e-2, λ = 1e-3


@pytest.fixture(scope="module")
def idx(problem):
    return removed_examples(problem, 6)


def mu(problem, damping=None):
    return problem.weight_decay + (problem.damping if damping is None else damping)


def eye(problem):
    return torch.eye(problem.n_params, dtype=problem.dtype)


def empirical_fisher(problem) -> torch.Tensor:
    g = problem.gradients(problem.train)
    return g.T @ g / problem.n_train


# ---------------------------------------------------------------- arnoldi

@pytest.mark.parametrize("damping", [None, 1e-2])
def test_arnoldi_full_rank_is_exact(problem, idx, damping):
    d = problem.n_params
    est = Arnoldi(rank=d, damping=damping).fit(problem)
    assert est.method_ == "exact"
    ex = Exact(damping=damping).fit(problem)
    assert rel_err(est.parameter_change(idx), ex.parameter_change(idx)) < 1e-8
    assert rel_err(est.scores(idx, problem.query), ex.scores(idx, problem.query)) < 1e-8


def test_arnoldi_lanczos_top_eigenpairs(problem, idx):
    """The Lanczos path (Krylov size 40 < d = 51) finds G's top eigenvalues, and Δθ is the dense
    top-k formula ε U diag(1/(λ + μ)) Uᵀ ∇ℓₘ with U from eigh of the dense G."""
    k = 5
    est = Arnoldi(rank=k, iterations=40).fit(problem)
    assert est.method_ == "lanczos" and est.eigenvectors_.shape == (problem.n_params, k)
    values, vectors = torch.linalg.eigh(problem.gauss_newton_matrix())
    top, U = values[-k:].flip(0), vectors[:, -k:].flip(1)
    assert rel_err(est.eigenvalues_, top) < 1e-10
    Q = est.eigenvectors_
    assert torch.allclose(Q.T @ Q, torch.eye(k, dtype=Q.dtype), atol=1e-10)
    B = problem.epsilon * problem.train_gradients(idx)
    expected = ((B @ U) / (top + mu(problem))) @ U.T
    assert rel_err(est.parameter_change(idx), expected) < 1e-6
    # a different seed starts elsewhere and finds the same space
    other = Arnoldi(rank=k, iterations=40, seed=1).fit(problem)
    assert rel_err(other.parameter_change(idx), expected) < 1e-6


def test_arnoldi_lanczos_stops_on_an_invariant_space(problem):
    """G of a linear model on N < d examples has rank N: Lanczos ends exactly after N steps."""
    from estimators.checks import linear_problem
    lin = linear_problem(n_train=3, n_features=8)
    est = Arnoldi(rank=8, iterations=7).fit(lin.problem)
    assert est.method_ == "lanczos" and est.eigenvalues_.numel() <= 4
    dense = torch.linalg.eigvalsh(lin.problem.gauss_newton_matrix()).flip(0)[:3]
    assert rel_err(est.eigenvalues_[:3], dense) < 1e-10


# ---------------------------------------------------------------- trak

@pytest.mark.parametrize("damping", [None, 1e-2])
def test_trak_square_orthogonal_is_the_dense_empirical_fisher_solve(problem, idx, damping):
    est = TRAK(projection="orthogonal", projection_dim=problem.n_params, damping=damping).fit(problem)
    P = est.projection_
    assert torch.allclose(P.T @ P, eye(problem), atol=1e-12)
    A = empirical_fisher(problem) + mu(problem, damping) * eye(problem)
    expected = problem.epsilon * problem.gradients(problem.query) @ torch.linalg.solve(
        A, problem.train_gradients(idx).T)
    assert rel_err(est.scores(idx, problem.query), expected) < 1e-8


def test_trak_gaussian_projection(problem, idx):
    """The scores are ε ∇ℓ_qᵀ P (PᵀFP + μI)⁻¹ Pᵀ∇ℓₘ with the estimator's own P, whose entries are
    N(0, 1/k): E[P Pᵀ] = I, so with k = 2048 ≫ d = 51 the scores come near the dense F solve
    (measured 0.077 and 0.070 relative for seeds 0 and 1)."""
    gq, gm, Fm = problem.gradients(problem.query), problem.train_gradients(idx), empirical_fisher(problem)
    est = TRAK(projection_dim=64).fit(problem)
    P = est.projection_
    assert P.shape == (problem.n_params, 64)
    expected = problem.epsilon * (gq @ P) @ torch.linalg.solve(P.T @ Fm @ P + mu(problem) * torch.eye(64, dtype=P.dtype),
                                                               (gm @ P).T)
    assert rel_err(est.scores(idx, problem.query), expected) < 1e-10
    dense = problem.epsilon * gq @ torch.linalg.solve(Fm + mu(problem) * eye(problem), gm.T)
    for seed in (0, 1):
        assert rel_err(TRAK(seed=seed).fit(problem).scores(idx, problem.query), dense) < 0.15
    with pytest.raises(ValueError, match="orthogonal"):
        TRAK(projection="orthogonal", projection_dim=problem.n_params + 1).fit(problem)
    with pytest.raises(ValueError, match="projection"):
        TRAK(projection="sparse").fit(problem)


def test_trak_projects_in_chunks(idx):
    """Chunked gradients (chunk_size 7 does not divide N = 48) give the same features."""
    p, q = mlp_problem(), mlp_problem()
    q.chunk_size = 7
    a, b = TRAK(projection_dim=16).fit(p), TRAK(projection_dim=16).fit(q)
    assert torch.allclose(a.features_, b.features_, rtol=1e-12, atol=1e-15)
    assert torch.allclose(a.scores(idx, p.query), b.scores(idx, q.query), rtol=1e-10, atol=0)


# ---------------------------------------------------------------- grad-cos

def test_grad_cos_is_the_scaled_cosine(problem, idx):
    S = GradCos().fit(problem).scores(idx, problem.query)
    gq, gm = problem.gradients(problem.query), problem.train_gradients(idx)
    expected = problem.epsilon * F.cosine_similarity(gq[:, None, :], gm[None, :, :], dim=-1)
    torch.testing.assert_close(S, expected, rtol=1e-10, atol=0)
    assert not GradCos.uses_curvature and REGISTRY["grad-cos"] is GradCos


# ---------------------------------------------------------------- datainf

def one_example(problem: Problem) -> Problem:
    """The same model and θ with a training set of one example (N = 1, ε = 1)."""
    return Problem(task="one", scale="smoke", model=problem.model, params=problem.params,
                   train=problem.train.subset(torch.tensor([3])), query=problem.query, loss=problem.loss,
                   damping=problem.damping, weight_decay=problem.weight_decay, seed=problem.seed)


def block_diagonal(M: torch.Tensor, blocks: list[slice]) -> torch.Tensor:
    out = torch.zeros_like(M)
    for b in blocks:
        out[b, b] = M[b, b]
    return out


def test_datainf_blocks_are_layers(problem):
    names, numels = problem.model.names, problem.model.numels
    assert names == ["hidden.weight", "hidden.bias", "out.weight", "out.bias"]
    assert layer_blocks(names, numels) == [slice(0, 30), slice(30, 51)]
    assert layer_blocks(["weight"], [5]) == [slice(0, 5)]
    assert layer_blocks(["a.w", "b.w", "a.b"], [1, 2, 3]) == [slice(0, 1), slice(1, 3), slice(3, 6)]


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("damping", [None, 1e-2])
def test_datainf_is_exact_for_one_example(problem, per_layer, damping):
    """N = 1: (g gᵀ + μI)⁻¹ by Sherman–Morrison is exact, per block for the per-layer version."""
    p = one_example(problem)
    est = DataInf(per_layer=per_layer, damping=damping).fit(p)
    g = p.gradients(p.train)
    A = block_diagonal(g.T @ g, est.blocks_) + mu(p, damping) * eye(p)
    V = torch.randn(4, p.n_params, dtype=p.dtype, generator=torch.Generator().manual_seed(0))
    assert rel_err(est.inverse_product(V), torch.linalg.solve(A, V.T).T) < 1e-10
    idx = torch.tensor([0])
    expected = p.epsilon * p.gradients(p.query) @ torch.linalg.solve(A, g.T)
    assert rel_err(est.scores(idx, p.query), expected) < 1e-10


def test_datainf_is_the_mean_of_rank_one_inverses(problem, idx):
    """N = 48: H⁻¹ = (1/N) Σᵢ (blockdiag(gᵢgᵢᵀ) + μI)⁻¹, formed densely."""
    est = DataInf().fit(problem)
    G = problem.gradients(problem.train)
    I, m = eye(problem), mu(problem)
    H_inv = sum(torch.linalg.inv(block_diagonal(torch.outer(g, g), est.blocks_) + m * I) for g in G) / len(G)
    expected = problem.epsilon * problem.train_gradients(idx) @ H_inv
    assert rel_err(est.parameter_change(idx), expected) < 1e-10
    q = mlp_problem()
    q.chunk_size = 5
    assert rel_err(DataInf().fit(q).parameter_change(idx), expected) < 1e-10


# ---------------------------------------------------------------- lissa depth rule

def test_lissa_depth_rule(problem):
    """depth=None: J = ⌈s/μ⌉ clipped to [100, 2000]; an explicit depth overrides it."""
    assert lissa_depth(17.95, 0.006) == 2000  # mlp-mnist at cpu scale: the rule asks 2992, the cap decides
    assert lissa_depth(1.0, 1.0) == LiSSA.MIN_DEPTH == 100
    assert lissa_depth(1e6, 1.0) == LiSSA.MAX_DEPTH == 2000
    est = LiSSA().fit(problem)
    assert est.depth is None and est.mu_ == mu(problem)
    assert LiSSA.MIN_DEPTH < est.scale_ / est.mu_ < LiSSA.MAX_DEPTH  # the rule, not the clip, decides here
    assert est.depth_ == int(torch.tensor(est.scale_ / est.mu_).ceil())
    explicit = LiSSA(depth=37).fit(problem)
    assert explicit.depth_ == 37 and explicit.get_params()["depth"] == 37
    assert make_estimator("lissa-depth5000").fit(problem).depth_ == 5000


def test_lissa_full_batch_closed_form_is_the_recursion(problem, monkeypatch):
    """batch_size ≥ N: the eigenbasis closed form gives the J-step recursion's own answer (not the
    exact solve: depth 60 leaves a visible truncation), and diverges where the recursion does."""
    idx = torch.tensor([0, 3, 7])
    closed = LiSSA(depth=60, batch_size=problem.n_train, repeats=2).fit(problem)
    assert closed.eigh_ is not None
    monkeypatch.setattr(LiSSA, "DENSE_MAX_PARAMS", 0)
    recursion = LiSSA(depth=60, batch_size=problem.n_train, repeats=2).fit(problem)
    assert recursion.eigh_ is None
    expected = recursion.parameter_change(idx)
    assert rel_err(closed.parameter_change(idx), expected) < 1e-10
    assert rel_err(expected, Exact().fit(problem).parameter_change(idx)) > 1e-3
    lam_max = float(closed.eigh_[0].max())
    monkeypatch.setattr(LiSSA, "DENSE_MAX_PARAMS", 10 ** 9)
    with pytest.raises(FloatingPointError, match="scale"):
        LiSSA(depth=300, scale=lam_max / 50, batch_size=problem.n_train).fit(problem).parameter_change(idx)
    minibatch = LiSSA(depth=5, batch_size=problem.n_train - 1).fit(problem)
    assert minibatch.eigh_ is None  # fresh minibatches: no fixed G, the recursion runs


def test_lissa_reruns_rows_that_a_sharp_minibatch_amplified(problem, monkeypatch):
    """A step h ← b + (I − (G_B + μI)/s) h cannot grow ‖h‖ by more than ‖b‖ while every minibatch
    has λ_max(G_B) + μ ≤ 2s. At s = 0.76 λ_max(G) with minibatches of 4, some rows break that
    bound: exactly those rows are rerun at 2s (each row equal to the fixed-scale recursion at the
    first scale where it stayed bounded), the others keep s, a subset of rows gets the same rows
    (the minibatches depend only on the seed), and `solver_` says how many were rerun. Where
    no row breaks it nothing changes; where doubling does not help it raises."""
    from benchmark.linalg import top_eigenvalue
    idx = torch.arange(0, 48, 4)
    b = problem.epsilon * problem.train_gradients(idx)
    lam = top_eigenvalue(problem.gnvp, problem.n_params, problem.dtype, problem.device, 50,
                         torch.Generator().manual_seed(0))
    est = LiSSA(depth=300, batch_size=4, scale=0.76 * lam).fit(problem)
    x = est.parameter_change(idx)
    assert 0 < est.rows_rescaled_ < len(idx)
    assert est.solver_ == f"recursion; scale doubled for {est.rows_rescaled_} row(s)"
    first, stable_first = est._recursion(b, 0.76 * lam, 300)
    second, stable_second = est._recursion(b, 2 * 0.76 * lam, 300)
    assert int((~stable_first).sum()) == est.rows_rescaled_ and stable_second.all()
    problem.counter.reset()
    est._recursion(b, 0.76 * lam, 300)
    full = 300 * 4 * len(idx)  # minibatch products if the unbounded rows had stayed in the recursion
    assert full - 300 * 4 * est.rows_rescaled_ < problem.counter.as_dict()["gnvp"] < full  # they left early
    assert torch.equal(x, torch.where(stable_first[:, None], first, second))
    # the same minibatches for a subset of rows: equal up to the float32 products' rounding, which
    # depends on how many vectors a product holds (2e-8 relative on an Intel Xeon, 0 on an AMD
    # EPYC); another seed's minibatches are > 1e-3 away (test_lissa_float32_products_keep_...)
    subset = LiSSA(depth=300, batch_size=4, scale=0.76 * lam).fit(problem).parameter_change(idx[3:7])
    assert rel_err(subset, x[3:7]) < 1e-6
    calm = LiSSA(depth=300, batch_size=4, scale=2 * lam).fit(problem)
    assert torch.equal(calm.parameter_change(idx), calm._recursion(b, 2 * lam, 300)[0]) and calm.rows_rescaled_ == 0
    assert calm.solver_ == "recursion"
    monkeypatch.setattr(LiSSA, "MAX_SCALE_DOUBLINGS", 0)
    with pytest.raises(FloatingPointError, match="beyond the stable bound.*larger `scale`"):
        LiSSA(depth=300, batch_size=4, scale=0.76 * lam).fit(problem).parameter_change(idx)


def test_lissa_float32_products_keep_the_float64_recursion(problem, idx):
    """gauss_newton_dtype="float32" (the default) runs only the minibatch products G_B h in a
    float32 copy of the problem: h stays float64 and the answer moves by float32 rounding, far
    below the minibatch noise (checked against a different seed); None keeps every product in
    float64, and a dtype that is not a float is refused by name."""
    low = LiSSA(depth=200, batch_size=12).fit(problem)
    full = LiSSA(depth=200, batch_size=12, gauss_newton_dtype=None).fit(problem)
    assert low.products_.dtype == torch.float32 and full.products_ is problem
    x, x64 = low.parameter_change(idx), full.parameter_change(idx)
    assert x.dtype == torch.float64
    assert 0 < rel_err(x, x64) < 1e-5
    assert rel_err(LiSSA(depth=200, batch_size=12, seed=1).fit(problem).parameter_change(idx), x64) > 1e-3
    closed = LiSSA(depth=60, batch_size=problem.n_train).fit(problem)
    assert closed.products_ is problem  # the full-batch closed form is float64 throughout
    with pytest.raises(ValueError, match="gauss_newton_dtype='int8'.*float32"):
        LiSSA(gauss_newton_dtype="int8").fit(problem)


def test_lissa_full_batch_closed_form_through_the_kernel(monkeypatch):
    """Where G's factor F (N·C rows) has fewer than d/2 rows, the closed form comes from the
    eigenbasis of the kernel FFᵀ/N (no d×d matrix): the same answer as the dense eigenbasis
    and as the recursion itself (depth 60: a visible truncation), to rounding."""
    from benchmark.linalg import KernelSolver
    problem = mlp_problem(n_train=10, sizes=(4, 12, 3))  # d = 99
    idx = torch.tensor([0, 4, 9])
    kernel = LiSSA(depth=60, batch_size=problem.n_train).fit(problem)
    # N·(C − 1) = 20 rows: each softmax Hessian's null direction left out (psd_sqrt)
    assert kernel.kernel_ is not None and kernel.eigh_ is None and kernel.kernel_[0].shape == (20, 99)
    with monkeypatch.context() as m:
        m.setattr(KernelSolver, "cheaper", staticmethod(lambda rows, d: False))
        dense = LiSSA(depth=60, batch_size=problem.n_train).fit(problem)
        m.setattr(LiSSA, "DENSE_MAX_PARAMS", 0)
        recursion = LiSSA(depth=60, batch_size=problem.n_train).fit(problem)
    assert dense.kernel_ is None and dense.eigh_ is not None and recursion.eigh_ is recursion.kernel_ is None
    expected = recursion.parameter_change(idx)
    assert rel_err(kernel.parameter_change(idx), expected) < 1e-10
    assert rel_err(dense.parameter_change(idx), expected) < 1e-10
    assert rel_err(expected, Exact().fit(problem).parameter_change(idx)) > 1e-3
