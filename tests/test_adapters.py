"""The peer-library adapters (estimators/adapters) against our own implementations of the same maths.

Each library test is skipped only where its library is not installed (the `peers` extra); the
missing-library tests run everywhere. Where the maths is the same the adapters must agree with ours
to rounding: kronfluence's EK-FAC / K-FAC with our ekfac / kfac, pyDVL's CG and full-rank Arnoldi /
Nyström with exact. pyDVL's EK-FAC has a curvature of its own (estimators/adapters/pydvl.py), so
it is checked against that maths, written out here for one softmax layer.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmark.problem import Batch, FunctionalModel, Problem
from estimators import PEER_REGISTRY, UnknownEstimator, make_estimator
from estimators.adapters import MissingPeerLibrary
from estimators.checks import linear_problem, mlp_problem, removed_examples

DTYPE = torch.float64
LIBRARY = {"kronfluence": "kronfluence", "pydvl": "pydvl"}


def library_of(name: str) -> str:
    return LIBRARY[name.split("-")[0]]


def agreement(S: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    """Pooled Pearson, regression slope of S on ref through 0, relative Frobenius error."""
    a, b = S.flatten(), ref.flatten()
    pearson = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    return pearson, float(a @ b / (b @ b)), float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def scores(name: str, problem: Problem, idx=None, **params) -> torch.Tensor:
    idx = removed_examples(problem) if idx is None else idx
    return make_estimator(name, **params).fit(problem).scores(idx, problem.query)


@pytest.fixture(scope="module")
def mlp():
    return mlp_problem()


# ---------------------------------------------------------------- everywhere: registration, missing library

def test_registering_imports_no_peer_library():
    code = ("import sys, estimators; from estimators import PEER_REGISTRY; "
            "assert not {'kronfluence', 'pydvl'} & set(sys.modules), sorted({'kronfluence', 'pydvl'} & set(sys.modules)); "
            "assert 'kronfluence-ekfac' in PEER_REGISTRY and 'pydvl-cg' in PEER_REGISTRY")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", list(PEER_REGISTRY))
def test_missing_library_names_the_extra(name, monkeypatch):
    monkeypatch.setitem(sys.modules, library_of(name), None)  # importlib then finds no such module
    with pytest.raises(MissingPeerLibrary, match=r'pip install -e "\.\[peers\]"') as info:
        make_estimator(name)
    assert isinstance(info.value, ImportError) and library_of(name) in str(info.value)


def test_unknown_name_lists_the_peer_adapters():
    with pytest.raises(UnknownEstimator, match="kronfluence-ekfac"):
        make_estimator("kronfluence-ekfc")


# ---------------------------------------------------------------- kronfluence

@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_kronfluence_equals_our_kfac(mlp, strategy):
    """Same maths (exact GGN pseudo-gradients, μ on the Kronecker product, ε = 1/N): equal to rounding."""
    pytest.importorskip("kronfluence", reason="kronfluence is not installed (the peers extra)")
    S, ref = scores(f"kronfluence-{strategy}", mlp), scores(strategy, mlp)
    pearson, slope, error = agreement(S, ref)
    assert pearson > 0.99 and abs(slope - 1) < 0.05 and error < 1e-8, (pearson, slope, error)
    assert S.dtype == DTYPE and S.shape == (len(mlp.query), len(removed_examples(mlp)))


def test_kronfluence_damping_is_wd_plus_lambda(mlp):
    pytest.importorskip("kronfluence", reason="kronfluence is not installed (the peers extra)")
    S, ref = scores("kronfluence-ekfac", mlp, damping=0.1), scores("ekfac", mlp, damping=0.1)
    assert agreement(S, ref)[2] < 1e-8
    assert agreement(S, scores("ekfac", mlp))[2] > 0.05  # the damping matters at this size


# ---------------------------------------------------------------- pyDVL

@pytest.mark.parametrize("name, params, tol", [
    ("pydvl-cg", {"rtol": 1e-10, "maxiter": 200}, 1e-7),
    ("pydvl-arnoldi", {"rank": 51}, 1e-8),  # full rank (d = 51): the exact inverse
    ("pydvl-nystroem", {"rank": 51}, 1e-8),
])
def test_pydvl_solvers_equal_exact(mlp, name, params, tol):
    """pyDVL's solvers on the surrogate whose Hessian is G, damping wd + λ, ε: exact's scores."""
    pytest.importorskip("pydvl.influence.torch", reason="pyDVL is not installed (the peers extra)")
    pearson, slope, error = agreement(scores(name, mlp, **params), scores("exact", mlp))
    assert pearson > 0.99 and abs(slope - 1) < 0.05 and error < tol, (pearson, slope, error)


def test_pydvl_cg_on_the_closed_form():
    pytest.importorskip("pydvl.influence.torch", reason="pyDVL is not installed (the peers extra)")
    lp = linear_problem()
    idx = torch.arange(lp.problem.n_train)
    S = scores("pydvl-cg", lp.problem, idx, rtol=1e-12)
    assert agreement(S, lp.closed_form_scores(idx))[2] < 1e-8


def test_pydvl_lissa_close_to_exact(mlp):
    """LiSSA stops at its tolerance: close, not equal (a flipped sign or a missing ε is far off)."""
    pytest.importorskip("pydvl.influence.torch", reason="pyDVL is not installed (the peers extra)")
    S = scores("pydvl-lissa", mlp)
    pearson, slope, _ = agreement(S, scores("exact", mlp))
    assert pearson > 0.99 and abs(slope - 1) < 0.1, (pearson, slope)
    assert torch.equal(S, scores("pydvl-lissa", mlp))  # seeded minibatches: reproducible


def softmax_regression(n=60, p=4, C=3, seed=0) -> Problem:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    X, Xq = torch.randn(n, p, generator=g, dtype=DTYPE), torch.randn(5, p, generator=g, dtype=DTYPE)
    y, yq = torch.randint(C, (n,), generator=g), torch.randint(C, (5,), generator=g)
    model = FunctionalModel(nn.Linear(p, C).to(DTYPE))
    loss = lambda out, t: F.cross_entropy(out, t, reduction="none")
    return Problem(task="pydvl-ekfac-test", scale="smoke", model=model, params=model.flatten(), train=Batch(X, y),
                   query=Batch(Xq, yq), loss=loss, damping=1e-3, weight_decay=1e-2, seed=0)


def pydvl_ekfac_reference(problem: Problem, idx: torch.Tensor) -> torch.Tensor:
    """pyDVL's EK-FAC written out for one softmax layer z = W x + b: a = [x, 1], pseudo-gradient
    g = √p − p Σ√p, A = mean a aᵀ, S = mean g gᵀ, Λ = mean (Q_Sᵀ g)² (Q_Aᵀ a)²ᵀ, and
    S[q, m] = ε ⟨∇ℓ_q, Q_S [(Q_Sᵀ ∇ℓₘ Q_A) / (Λ + μ)] Q_Aᵀ⟩ with gradients (p − e_t) aᵀ as (C, p + 1)."""
    W, b = problem.model.unflatten(problem.params).values()
    def parts(batch):
        a = torch.cat([batch.inputs, torch.ones(len(batch), 1, dtype=DTYPE)], 1)
        prob = torch.softmax(batch.inputs @ W.T + b, 1)
        return a, prob, (prob - F.one_hot(batch.targets, prob.shape[1])).unsqueeze(2) * a.unsqueeze(1)
    a, prob, _ = parts(problem.train)
    g = prob.sqrt() - prob * prob.sqrt().sum(1, keepdim=True)
    _, Q_A = torch.linalg.eigh(a.T @ a / len(a))
    _, Q_S = torch.linalg.eigh(g.T @ g / len(g))
    Lam = ((g @ Q_S).pow(2).T @ (a @ Q_A).pow(2)) / len(a)
    mu = problem.weight_decay + problem.damping
    _, _, G_m = parts(problem.train.subset(idx))
    _, _, G_q = parts(problem.query)
    delta = Q_S @ ((Q_S.T @ G_m @ Q_A) / (Lam + mu)) @ Q_A.T
    return problem.epsilon * torch.einsum("qij,mij->qm", G_q, delta)


def test_pydvl_ekfac_is_its_documented_maths():
    pytest.importorskip("pydvl.influence.torch", reason="pyDVL is not installed (the peers extra)")
    problem = softmax_regression()
    idx = torch.tensor([7, 0, 31, 59])
    S = scores("pydvl-ekfac", problem, idx)
    assert agreement(S, pydvl_ekfac_reference(problem, idx))[2] < 1e-8
    assert torch.get_default_dtype() == torch.float32  # the float64 workaround restored the default


def test_pydvl_ekfac_refuses_a_loss_other_than_cross_entropy():
    pytest.importorskip("pydvl.influence.torch", reason="pyDVL is not installed (the peers extra)")
    with pytest.raises(ValueError, match="cross-entropy"):
        make_estimator("pydvl-ekfac").fit(linear_problem().problem)
