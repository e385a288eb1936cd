"""Base training of a task's model: θ⁰ → θˢ with the task's recipe.

The objective is (1/N) Σᵢ wᵢ ℓᵢ(θ) + (wd/2)‖θ‖², with example weights w (all ones for the
base model; wₘ = 0 removes example m). Minibatch SGD estimates it without bias: the loss of a
batch B is (1/|B|) Σ_{i∈B} wᵢ ℓᵢ, so a removed example is left out of its own minibatch and
the batch order is the same with or without it. SGD works on stacked parameters (R, d) with
weights (R, N), vmapped, so several retrainings share one pass over the batches.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad, vmap

from tasks.base import Recipe

from .problem import Batch, FunctionalModel


@dataclass(frozen=True)
class TrainedModel:
    """θ⁰ (d,), θˢ (d,), and how training ended (full-batch objective and gradient norm)."""

    theta0: Tensor
    theta: Tensor
    certificate: dict


def objective_terms(model: FunctionalModel, loss, batch: Batch, theta: Tensor, weights: Tensor,
                    weight_decay: float, denominator: float) -> Tensor:
    """(1/denominator) Σᵢ wᵢ ℓᵢ(θ) + (wd/2)‖θ‖² over `batch` (a scalar)."""
    per_example = loss(model(theta, batch.inputs), batch.targets)
    return (weights * per_example).sum() / denominator + 0.5 * weight_decay * theta.pow(2).sum()


def full_objective_gradient(model: FunctionalModel, loss, data: Batch, theta: Tensor, weight_decay: float,
                            chunk_size: int = 4096) -> tuple[float, Tensor]:
    """Value and gradient of (1/N) Σᵢ ℓᵢ(θ) + (wd/2)‖θ‖² on the whole training set."""
    n = len(data)
    value, gradient = 0.0, torch.zeros_like(theta)
    for s in range(0, n, chunk_size):
        chunk = Batch(data.inputs[s:s + chunk_size], data.targets[s:s + chunk_size])
        w = torch.ones(len(chunk), dtype=theta.dtype, device=theta.device)
        th = theta.detach().requires_grad_(True)
        v = objective_terms(model, loss, chunk, th, w, 0.0, n)
        (g,) = torch.autograd.grad(v, th)
        value += float(v.detach())
        gradient += g
    value += 0.5 * weight_decay * float(theta.pow(2).sum())
    return value, gradient + weight_decay * theta


def batch_order(n: int, batch_size: int, epochs: int, seed: int, start_epoch: int = 0):
    """The minibatch index tensors of epochs [start_epoch, epochs), fixed by `seed`."""
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g)
        if epoch < start_epoch:
            continue
        for s in range(0, n, batch_size):
            yield epoch, perm[s:s + batch_size]


def learning_rate(recipe: Recipe, epoch: int) -> float:
    return recipe.lr * recipe.lr_gamma ** sum(epoch >= m for m in recipe.lr_milestones)


def sgd(model: FunctionalModel, loss, data: Batch, theta: Tensor, recipe: Recipe, *,
        weights: Tensor | None = None, epochs: int | None = None, seed: int | None = None,
        proximal: tuple[float, Tensor] | None = None) -> Tensor:
    """Minibatch SGD (with the recipe's momentum, learning-rate steps and weight decay).

    theta: (d,) or stacked (R, d); weights: (N,) or (R, N) example weights (default ones);
    proximal: optional (λ, anchor (d,)) adding (λ/2)‖θ − anchor‖². Returns θ of theta's shape.
    """
    stacked = theta.dim() == 2
    theta = theta if stacked else theta.unsqueeze(0)
    n = len(data)
    if weights is None:
        weights = torch.ones(n, dtype=theta.dtype, device=theta.device)
    weights = weights.expand(theta.shape[0], n) if weights.dim() == 1 else weights
    epochs = recipe.epochs if epochs is None else epochs
    seed = recipe.seed if seed is None else seed

    def batch_objective(th: Tensor, w: Tensor, x: Tensor, t: Tensor) -> Tensor:
        value = objective_terms(model, loss, Batch(x, t), th, w, recipe.weight_decay, x.shape[0])
        if proximal is not None:
            value = value + 0.5 * proximal[0] * (th - proximal[1]).pow(2).sum()
        return value

    step = vmap(grad(batch_objective), in_dims=(0, 0, None, None))
    velocity = torch.zeros_like(theta)
    theta = theta.clone()
    for epoch, idx in batch_order(n, recipe.batch_size or n, epochs, seed):
        g = step(theta, weights[:, idx], data.inputs[idx], data.targets[idx])
        velocity = recipe.momentum * velocity + g if recipe.momentum else g
        theta = theta - learning_rate(recipe, epoch) * velocity
    return theta if stacked else theta[0]


def lbfgs(model: FunctionalModel, loss, data: Batch, theta: Tensor, recipe: Recipe) -> Tensor:
    """Full-batch L-BFGS with strong-Wolfe line search to convergence (at most recipe.epochs
    iterations); meant for the convex tasks, in float64."""
    th = theta.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([th], lr=1.0, max_iter=recipe.epochs, history_size=50, tolerance_grad=1e-14,
                            tolerance_change=0.0, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value, g = full_objective_gradient(model, loss, data, th.detach(), recipe.weight_decay)
        th.grad = g
        return torch.tensor(value, dtype=th.dtype)

    opt.step(closure)
    return th.detach()


def train(model: FunctionalModel, loss, data: Batch, recipe: Recipe) -> TrainedModel:
    """Train from the module's current parameters (θ⁰) with `recipe` -> TrainedModel."""
    start = time.perf_counter()
    theta0 = model.flatten()
    if recipe.optimizer == "lbfgs":
        theta = lbfgs(model, loss, data, theta0, recipe)
    elif recipe.optimizer == "sgd":
        theta = sgd(model, loss, data, theta0, recipe)
    else:
        raise ValueError(f"unknown optimizer {recipe.optimizer!r} in the recipe; use 'lbfgs' or 'sgd'")
    value, g = full_objective_gradient(model, loss, data, theta, recipe.weight_decay)
    certificate = {
        "objective": value,
        "gradient_norm": float(g.norm()),
        "seconds": time.perf_counter() - start,
    }
    if not torch.isfinite(theta).all():
        raise FloatingPointError(f"training diverged (non-finite parameters); recipe {recipe}")
    return TrainedModel(theta0, theta, certificate)
