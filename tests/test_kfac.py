"""K-FAC and EK-FAC (estimators/kfac.py) against dense references.

Where the Kronecker structure is exact the scores must equal `exact`'s (the dense damped GGN
solve): one nn.Linear layer with squared error has H_y = I, so the pseudo-gradients s are the
columns of R = I whatever the input, S = (1/N) Σᵢ Σ_c e_c e_cᵀ = I and G = E[a aᵀ] ⊗ I = A ⊗ S
(one output: G = E[a aᵀ s²] with s = 1), for C = 1 and C > 1 alike, K-FAC and EK-FAC alike. EK-FAC is exact also
where G's block is diagonal in the Kronecker eigenbasis but not a Kronecker product: a single
logistic output on one-hot inputs (block diag(nⱼ E[s² | j])/N, K-FAC's diag(nⱼ) E[s²]/N). Elsewhere
EK-FAC's eigenvalues must be the diagonal of the dense GGN block in its basis (which pins the
pseudo-gradients, their layout and positions, for Linear, sequence Linear and Conv2d layers).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmark.problem import Batch, FunctionalModel, Problem
from estimators import Exact, make_estimator
from estimators.checks import mlp_problem

DTYPE = torch.float64


def squared_error(out, t):
    return 0.5 * (out - t).pow(2).sum(1)


def cross_entropy(out, t):
    return F.cross_entropy(out, t, reduction="none")


def logistic(out, t):
    return F.binary_cross_entropy_with_logits(out[:, 0], t, reduction="none")


def make_problem(module: nn.Module, X, t, Xq, tq, loss, weight_decay=1e-2, damping=1e-3) -> Problem:
    model = FunctionalModel(module.to(DTYPE))
    return Problem(task="kfac-test", scale="smoke", model=model, params=model.flatten(), train=Batch(X, t),
                   query=Batch(Xq, tq), loss=loss, damping=damping, weight_decay=weight_decay, seed=0)


def linear_regression(n_out: int, n=40, p=4, seed=0) -> Problem:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    X, Xq = torch.randn(n, p, generator=g, dtype=DTYPE), torch.randn(5, p, generator=g, dtype=DTYPE) + 0.3
    t, tq = torch.randn(n, n_out, generator=g, dtype=DTYPE), torch.randn(5, n_out, generator=g, dtype=DTYPE)
    return make_problem(nn.Linear(p, n_out), X, t, Xq, tq, squared_error)


def one_hot_logistic(counts=(3, 5, 8, 13), seed=0) -> Problem:
    """Logistic regression without bias on one-hot inputs, distinct class counts (so A's
    eigenvectors are the unit vectors) and random labels and weights (so s² varies)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    k = len(counts)
    X = torch.eye(k, dtype=DTYPE).repeat_interleave(torch.tensor(counts), dim=0)
    t = torch.randint(2, (len(X),), generator=g).to(DTYPE)
    module = nn.Linear(k, 1, bias=False)
    nn.init.normal_(module.weight, std=2.0, generator=g)
    return make_problem(module, X, t, torch.eye(k, dtype=DTYPE), torch.tensor([1.0, 0, 1, 0], dtype=DTYPE),
                        logistic)


def relative_error(a, b) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def all_scores(name, problem):
    est = Exact() if name == "exact" else make_estimator(name)
    return est.fit(problem).scores(torch.arange(problem.n_train), problem.query)


@pytest.mark.parametrize("name", ["kfac", "ekfac"])
@pytest.mark.parametrize("n_out", [1, 3])
def test_exact_on_one_linear_layer_with_squared_error(name, n_out):
    p = linear_regression(n_out)
    assert relative_error(all_scores(name, p), all_scores("exact", p)) < 1e-8


def test_ekfac_exact_where_the_block_is_diagonal_in_the_kronecker_basis():
    p = one_hot_logistic()
    exact = all_scores("exact", p)
    assert relative_error(all_scores("ekfac", p), exact) < 1e-8
    assert relative_error(all_scores("kfac", p), exact) > 1e-2  # not a Kronecker product: K-FAC is off


def layer_index(layer) -> torch.Tensor:
    """Flat θ positions of a layer's (out, in) block, row-major, the bias as the last column."""
    w = torch.arange(layer.weight.start, layer.weight.stop).reshape(layer.out, -1)
    if layer.bias is not None:
        w = torch.cat([w, torch.arange(layer.bias.start, layer.bias.stop)[:, None]], 1)
    return w.flatten()


class Sequence(nn.Module):
    """x (n, T·p) -> (n, T, p) -> Linear -> tanh -> flatten -> Linear: the first layer sees T positions."""

    def __init__(self, T=3, p=2, h=3, n_out=3):
        super().__init__()
        self.T, self.p = T, p
        self.inner = nn.Linear(p, h)
        self.out = nn.Linear(T * h, n_out)

    def forward(self, x):
        return self.out(torch.tanh(self.inner(x.reshape(len(x), self.T, self.p))).flatten(1))


def conv_net(stride=1):
    side = 4 if stride == 1 else 2
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=stride), nn.Tanh(), nn.Flatten(),
                         nn.Linear(3 * side * side, 3))


def classifier(module, input_shape, n=12, seed=0) -> Problem:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = module()
    X = torch.randn(n, *input_shape, generator=g, dtype=DTYPE)
    y = torch.randint(3, (n,), generator=g)
    return make_problem(module, X, y, X[:3], y[:3], cross_entropy)


PROBLEMS = {
    "mlp": mlp_problem,
    "sequence": lambda: classifier(Sequence, (6,)),
    "conv": lambda: classifier(conv_net, (2, 4, 4)),
    "conv-stride2": lambda: classifier(lambda: conv_net(stride=2), (2, 4, 4)),
}


@pytest.mark.parametrize("which", list(PROBLEMS))
def test_ekfac_eigenvalues_are_the_dense_ggn_diagonal_in_the_kronecker_basis(which):
    p = PROBLEMS[which]()
    G = p.gauss_newton_matrix()
    est = make_estimator("ekfac").fit(p)
    kfac = make_estimator("kfac").fit(p)
    assert len(est.layers_) == 2
    for layer, k_layer in zip(est.layers_, kfac.layers_):
        ix = layer_index(layer)
        block = G[ix][:, ix]
        Q = torch.kron(layer.Q_S, layer.Q_A)  # row-major vec(Q_Sᵀ V Q_A) = Qᵀ vec(V)
        expected = torch.diagonal(Q.T @ block @ Q).reshape(layer.out, -1)
        torch.testing.assert_close(layer.eigenvalues, expected, rtol=1e-10, atol=1e-12 * float(expected.max()))
        # the eigenvalue correction is the best diagonal in that basis (George et al. 2018)
        approx = lambda L: Q @ torch.diag(L.eigenvalues.flatten()) @ Q.T
        assert torch.linalg.norm(block - approx(layer)) <= torch.linalg.norm(block - approx(k_layer)) + 1e-12


def conv_reference(p: Problem):
    """A and S of the convolution of `conv_net` by explicit patches and per-example Jacobians."""
    module = p.module()
    conv, head = module[0], module[1:]
    k, s, pad = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    X = p.train.inputs
    Z = conv(X).detach()  # (n, out, H, W)
    xp = F.pad(X, (pad,) * 4)
    H, W = Z.shape[2:]
    patches = torch.stack([torch.cat([xp[:, :, h * s:h * s + k, w * s:w * s + k].reshape(len(X), -1),
                                      torch.ones(len(X), 1, dtype=DTYPE)], 1)
                           for h in range(H) for w in range(W)], 1)  # (n, L, in)
    A = torch.einsum("nti,ntj->ij", patches, patches) / (len(X) * H * W)
    S = torch.zeros(Z.shape[1], Z.shape[1], dtype=DTYPE)
    for z, t in zip(Z, p.train.targets):
        J = torch.autograd.functional.jacobian(lambda z_: head(z_[None])[0], z)  # (C, out, H, W)
        prob = torch.softmax(head(z[None])[0], 0).detach()
        Hy = torch.diag(prob) - torch.outer(prob, prob)
        ds = J.reshape(len(prob), Z.shape[1], -1)  # (C, out, L)
        S += torch.einsum("ab,aot,bpt->op", Hy, ds, ds)  # Σ_c s sᵀ = Jᵀ H_y J summed over positions
    return A, S / len(X)


@pytest.mark.parametrize("which", ["conv", "conv-stride2"])
def test_conv_factors_match_brute_force(which):
    p = PROBLEMS[which]()
    layer = make_estimator("kfac").fit(p).layers_[0]
    A, S = conv_reference(p)
    torch.testing.assert_close(layer.A, A, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.S, S, rtol=1e-10, atol=1e-12)


def test_mlp_correlates_with_exact_and_ekfac_at_least_as_well():
    """Measured on mlp_problem() (seed 0, μ = 0.011, d = 51): mean per-query Pearson with exact
    kfac 0.714, ekfac 0.732 (min over queries 0.621, 0.669), grad-dot 0.521; the exact block-
    diagonal GGN itself reaches only 0.873, so > 0.9 is out of reach for any layer-blockwise method
    here. Seeds 1-3: kfac 0.77, 0.86, 0.82; ekfac 0.79, 0.86, 0.82."""
    p = mlp_problem()
    exact = all_scores("exact", p)
    pearson = {}
    for name in ("kfac", "ekfac", "grad-dot"):
        S = all_scores(name, p)
        pearson[name] = [float(np.corrcoef(S[q], exact[q])[0, 1]) for q in range(len(exact))]
    for name in ("kfac", "ekfac"):
        assert np.mean(pearson[name]) > 0.65 and min(pearson[name]) > 0.55, (name, pearson[name])
        assert np.mean(pearson[name]) > np.mean(pearson["grad-dot"]) + 0.1
    assert np.mean(pearson["ekfac"]) >= np.mean(pearson["kfac"])


def test_parameters_outside_factored_layers_get_the_damped_identity():
    """A LayerNorm between two Linear layers: its coordinates of Δθ are ε ∇ℓₘ / μ."""
    torch.manual_seed(0)
    module = lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3))
    p = classifier(module, (3,))
    est = make_estimator("kfac").fit(p)
    idx = torch.arange(4)
    delta = est.parameter_change(idx)
    norm = slice(16, 24)  # LayerNorm weight and bias, after the first layer's 12 + 4
    assert [n for n in p.model.names][2:4] == ["1.weight", "1.bias"]
    expected = p.epsilon * p.train_gradients(idx)[:, norm] / est.mu_
    torch.testing.assert_close(delta[:, norm], expected, rtol=1e-12, atol=0)


def test_fit_reports_its_evaluations_to_the_counter():
    p = linear_regression(3)
    make_estimator("ekfac").fit(p)
    assert p.counter.counts["forward"] == 2 * p.n_train  # two passes
    assert p.counter.counts["gradient"] == 2 * p.n_train * 3  # a backward per example and output column


def test_sequence_activations_are_averaged_over_positions():
    """A sequence layer's A is the mean of [x_t, 1][x_t, 1]ᵀ over examples AND positions."""
    p = PROBLEMS["sequence"]()
    a = p.train.inputs.reshape(p.n_train * 3, 2)
    a = torch.cat([a, torch.ones(len(a), 1, dtype=DTYPE)], 1)
    torch.testing.assert_close(make_estimator("kfac").fit(p).layers_[0].A, a.T @ a / len(a), rtol=1e-12, atol=0)
