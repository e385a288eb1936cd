"""TracIn-CP and the training checkpoints it reads (benchmark.training.training_checkpoints,
Problem.checkpoints, estimators/tracin.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmark.metrics import correlations
from benchmark.problem import Batch, FunctionalModel, Problem
from benchmark.training import checkpoint_epochs, sgd, train, training_checkpoints
from estimators import TracIn, make_estimator
from tasks.base import Recipe

DTYPE = torch.float64


def squared_error(out, t):
    return 0.5 * (out[:, 0] - t).pow(2)


def linear_setup(n=40, features=4, lr=0.05, epochs=12, batch_size=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g, dtype=DTYPE)
    t = x @ torch.randn(features, generator=g, dtype=DTYPE) + 0.3 * torch.randn(n, generator=g, dtype=DTYPE)
    xq = torch.randn(6, features, generator=g, dtype=DTYPE)
    tq = xq @ torch.randn(features, generator=g, dtype=DTYPE)
    torch.manual_seed(seed)
    model = FunctionalModel(nn.Linear(features, 1).to(DTYPE))
    recipe = Recipe(optimizer="sgd", epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    return model, Batch(x, t), Batch(xq, tq), recipe


def test_checkpoint_epochs_are_spread_and_end_at_the_last():
    assert checkpoint_epochs(10, 5) == [1, 3, 5, 7, 9]
    assert checkpoint_epochs(3, 5) == [0, 1, 2]
    assert checkpoint_epochs(7, 1) == [6]


@pytest.mark.parametrize("batch_size", [None, 16])
def test_checkpoints_replay_the_base_training(batch_size):
    """The seeded training run again ends at θˢ bitwise, its last checkpoint is θˢ, and the
    weights are η · epochs-since-previous / |B|."""
    model, data, _, recipe = linear_setup(batch_size=batch_size, epochs=10)
    trained = train(model, squared_error, data, recipe)
    kept, final = training_checkpoints(model, squared_error, data, trained.theta0, recipe, count=5)
    assert torch.equal(final, trained.theta) and torch.equal(kept[-1].theta, trained.theta)
    assert [c.epoch for c in kept] == [1, 3, 5, 7, 9]
    batch = batch_size or len(data)
    assert [c.weight for c in kept] == pytest.approx([recipe.lr * 2 / batch] * 5)
    # the third checkpoint is θ after 6 epochs
    assert torch.allclose(kept[2].theta, sgd(model, squared_error, data, trained.theta0, recipe, epochs=6))


def test_tracin_predicts_leave_one_out_retraining_of_gradient_descent():
    """Full-batch gradient descent with a small learning rate, a checkpoint every epoch:
    removing m changes every step by +η/N ∇ℓₘ, so TracIn predicts the change of the query
    losses under leave-one-out retraining to first order: same sign, slope ≈ 1."""
    model, data, query, recipe = linear_setup(lr=0.02, epochs=12)
    trained = train(model, squared_error, data, recipe)
    kept, _ = training_checkpoints(model, squared_error, data, trained.theta0, recipe, count=recipe.epochs)
    problem = Problem(task="tracin-check", scale="smoke", model=model, params=trained.theta, train=data,
                      query=query, loss=squared_error, damping=1e-3, weight_decay=0.0, seed=0,
                      theta0=trained.theta0)
    problem.checkpoint_source = lambda: kept
    removed = torch.arange(0, len(data), 3)
    S = TracIn().fit(problem).scores(removed, query).numpy()
    weights = torch.ones(len(removed), len(data), dtype=DTYPE)
    weights[torch.arange(len(removed)), removed] = 0.0
    thetas = sgd(model, squared_error, data, trained.theta0.expand(len(removed), -1), recipe, weights=weights)
    base = squared_error(model(trained.theta, query.inputs), query.targets)
    truth = torch.stack([squared_error(model(th, query.inputs), query.targets) - base for th in thetas]).T.numpy()
    c = correlations(S, truth, n_boot=10)
    assert c["pearson"] > 0.98, c
    slope = float((S * truth).sum() / (S * S).sum())
    assert 0.8 < slope < 1.25, slope


def test_without_a_training_history_tracin_is_grad_dot():
    from estimators.checks import mlp_problem
    problem = mlp_problem()
    idx, q = torch.arange(5), problem.query
    tracin = make_estimator("tracin").fit(problem).scores(idx, q)
    assert torch.allclose(tracin, make_estimator("grad-dot").fit(problem).scores(idx, q), rtol=1e-12, atol=0)


def test_checkpoints_are_copies():
    from estimators.checks import mlp_problem
    problem = mlp_problem()
    problem.checkpoints()[0].theta.add_(1.0)
    assert torch.equal(problem.checkpoints()[0].theta, problem.params)


def test_unweighted_and_last_checkpoints():
    model, data, query, recipe = linear_setup(epochs=10)
    trained = train(model, squared_error, data, recipe)
    kept, _ = training_checkpoints(model, squared_error, data, trained.theta0, recipe, count=5)
    problem = Problem(task="tracin-check", scale="smoke", model=model, params=trained.theta, train=data,
                      query=query, loss=squared_error, damping=1e-3, weight_decay=0.0, seed=0)
    problem.checkpoint_source = lambda: kept
    last = TracIn(checkpoints=1).fit(problem)
    assert last.epochs_ == [9] and last.weights_ == pytest.approx([kept[-1].weight])
    assert TracIn(weighted=False).fit(problem).weights_ == pytest.approx([0.2] * 5)
    with pytest.raises(ValueError, match="at least 1"):
        TracIn(checkpoints=0).fit(problem)
