"""Shared tiny problems for the unit tests (float64, built here, no datasets).

Fixtures return factories so that each test picks its own sizes, weight decay and damping:

- `ridge`: a linear model f(θ, x) = θᵀx (no bias) with squared error ½(y − t)², and θˢ the
  exact (closed-form) minimiser of (1/N) Σ ℓᵢ + (wd/2)‖θ‖².
- `mlp`: a small MLP classifier (cross-entropy) with tanh or ReLU, slightly trained so that the
  gradients are not at initialisation only; the parameters are whatever they are (no
  stationarity needed for operator tests).
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmark.problem import Batch, FunctionalModel, Problem
from benchmark.training import lbfgs
from tasks.base import Recipe

DTYPE = torch.float64

# Every problem here is tiny: one intra-op thread avoids oversubscribing the (shared) cores,
# which otherwise makes these tests an order of magnitude slower.
torch.set_num_threads(1)


def squared_error(out, t):
    return 0.5 * (out - t).pow(2).sum(1)


def cross_entropy(out, t):
    return F.cross_entropy(out, t, reduction="none")


@dataclass
class Ridge:
    problem: Problem
    X: torch.Tensor  # (N, p)
    t: torch.Tensor  # (N,)
    theta: torch.Tensor  # θˢ (p,)
    wd: float
    lam: float

    @property
    def N(self) -> int:
        return self.X.shape[0]

    def A(self, lam: float | None = None) -> torch.Tensor:
        """XᵀX/N + (wd + λ) I."""
        lam = self.lam if lam is None else lam
        p = self.X.shape[1]
        return self.X.T @ self.X / self.N + (self.wd + lam) * torch.eye(p, dtype=DTYPE)

    def residual(self, m) -> torch.Tensor:
        """θˢᵀxₘ − tₘ."""
        return self.X[m] @ self.theta - self.t[m]

    def loss(self, theta: torch.Tensor, m) -> torch.Tensor:
        return 0.5 * (self.X[m] @ theta - self.t[m]).pow(2)


def make_ridge(N: int = 40, p: int = 5, wd: float = 0.05, lam: float = 1e-3, seed: int = 0,
               n_query: int = 6) -> Ridge:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, p, generator=g, dtype=DTYPE)
    true = torch.randn(p, generator=g, dtype=DTYPE)
    t = X @ true + 0.5 * torch.randn(N, generator=g, dtype=DTYPE)
    Xq = torch.randn(n_query, p, generator=g, dtype=DTYPE)
    tq = Xq @ true + 0.5 * torch.randn(n_query, generator=g, dtype=DTYPE)
    # θˢ = argmin (1/N) Σ ½(θᵀxᵢ − tᵢ)² + (wd/2)‖θ‖²
    theta = torch.linalg.solve(X.T @ X / N + wd * torch.eye(p, dtype=DTYPE), X.T @ t / N)
    module = nn.Linear(p, 1, bias=False).double()
    model = FunctionalModel(module)
    problem = Problem(task="ridge", scale="smoke", model=model, params=theta.clone(),
                      train=Batch(X, t[:, None]), query=Batch(Xq, tq[:, None]), loss=squared_error,
                      damping=lam, weight_decay=wd, seed=0)
    return Ridge(problem, X, t, theta, wd, lam)


def mlp_module(sizes: tuple[int, ...], activation: str) -> nn.Module:
    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).double()


_TRAINED: dict = {}  # (sizes, activation, n_train, weight_decay, seed, steps) -> θ, reused across tests


def make_mlp(sizes: tuple[int, ...] = (5, 4, 4, 3), activation: str = "tanh", n_train: int = 20,
             n_query: int = 5, damping: float = 1e-3, weight_decay: float = 1e-2, seed: int = 0,
             chunk_size: int = 1024, train_steps: int = 0) -> Problem:
    """A fresh Problem (own counter) on a seeded MLP; `train_steps` L-BFGS iterations of the
    training objective first (memoised: the same arguments give the same θ without retraining)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = mlp_module(sizes, activation)
    n_in, n_out = sizes[0], sizes[-1]
    X = torch.randn(n_train, n_in, generator=g, dtype=DTYPE)
    y = torch.randint(n_out, (n_train,), generator=g)
    Xq = torch.randn(n_query, n_in, generator=g, dtype=DTYPE)
    yq = torch.randint(n_out, (n_query,), generator=g)
    model = FunctionalModel(module)
    theta = model.flatten()
    key = (tuple(sizes), activation, n_train, weight_decay, seed, train_steps)
    if train_steps and key in _TRAINED:
        theta = _TRAINED[key].clone()
    elif train_steps:  # a few full-batch L-BFGS steps so that θ is not a random initialisation
        theta = lbfgs(model, cross_entropy, Batch(X, y), theta,
                      Recipe("lbfgs", epochs=train_steps, weight_decay=weight_decay))
        _TRAINED[key] = theta.clone()
    return Problem(task="mlp", scale="smoke", model=model, params=theta, train=Batch(X, y),
                   query=Batch(Xq, yq), loss=cross_entropy, damping=damping, weight_decay=weight_decay,
                   seed=seed, chunk_size=chunk_size)


@pytest.fixture(scope="session")
def ridge():
    return make_ridge


@pytest.fixture(scope="session")
def mlp():
    return make_mlp
