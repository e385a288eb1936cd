"""Building a task's Problem (trained, cached) and its ground truth (solved, cached).

Ground truth, for R removed training examples and Q queries, per response function r:
  scores[q, m]   = ℓ_q(θʳ₋ₘ) − ℓ_q(θˢ)            (Q, R) test-loss differences
  outputs[m]     = f(θʳ₋ₘ, x) on a fixed evaluation subset of the training inputs (R, n_eval, C)
  certificate    how accurately θʳ₋ₘ solves its problem.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.func import vmap

from tasks.base import Task

from .cache import Cache, content_key
from .problem import Batch, FunctionalModel, Problem
from .responses import DampedGaussNewton, SolverSettings, linearized_pbrf, pbrf
from .training import train

# Bump when the ground-truth computation changes in a way that changes its numbers.
GROUND_TRUTH_VERSION = 1
RESPONSES = ("pbrf", "linear")


def seeded_choice(n: int, k: int, seed: int) -> Tensor:
    """k distinct sorted indices of range(n), fixed by `seed`."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:min(k, n)].sort().values


def build_problem(task: Task, scale: str, data_root: Path, cache: Cache, device: str = "cpu") -> Problem:
    """Load the data, train θˢ (or load it from the cache) and wrap everything as a Problem."""
    splits = task.data(scale, data_root)
    recipe = task.recipe(scale)
    gt_cfg = task.ground_truth_config(scale)
    torch.manual_seed(recipe.seed)
    module = task.model(scale).to(dtype=task.dtype, device=device)
    model = FunctionalModel(module)
    to = lambda t: t.to(device=device, dtype=task.dtype if t.is_floating_point() else t.dtype)
    train_data = Batch(to(splits.x_train), to(splits.y_train))

    def compute():
        trained = train(model, task.loss, train_data, recipe)
        return {"theta0": trained.theta0.cpu(), "theta": trained.theta.cpu(), "certificate": trained.certificate}

    trained, _ = cache.get_or_compute("models", f"{task.name}-{scale}", task.fingerprint(scale), compute)
    query_idx = seeded_choice(len(splits.x_query), gt_cfg.n_query, seed=recipe.seed + 1)
    problem = Problem(
        task=task.name, scale=scale, model=model, params=trained["theta"].to(device),
        train=train_data, query=Batch(to(splits.x_query[query_idx]), to(splits.y_query[query_idx])),
        loss=task.loss, damping=task.damping, weight_decay=recipe.weight_decay, seed=recipe.seed,
        theta0=trained["theta0"].to(device), training_certificate=trained["certificate"],
    )
    return problem


@dataclass
class GroundTruth:
    """Ground truth of one task at one scale. Tensors are on the CPU.

    removed (R,) training indices; eval_idx (n_eval,) training indices whose outputs are stored;
    base_outputs (n_eval, C) = f(θˢ, x); responses[name] = {"scores": (Q, R), "outputs":
    (R, n_eval, C), "certificate": dict}; key: the cache key it was stored under.
    """

    removed: Tensor
    eval_idx: Tensor
    base_outputs: Tensor
    responses: dict
    key: str
    seconds: float
    settings: dict

    def scores(self, response: str = "pbrf") -> Tensor:
        return self.response(response)["scores"]

    def response(self, name: str) -> dict:
        if name not in self.responses:
            raise KeyError(f"no ground truth {name!r}; available: {', '.join(self.responses)}")
        return self.responses[name]


def stacked_evaluations(problem: Problem, Delta: Tensor, eval_inputs: Tensor) -> tuple[Tensor, Tensor]:
    """For θ = θˢ + Δ_r (R, d): test-loss differences (Q, R) and outputs (R, n_eval, C)."""
    thetas = problem.params + Delta
    q = problem.query
    base = problem.loss(problem.model(problem.params, q.inputs), q.targets)
    losses = vmap(lambda th: problem.loss(problem.model(th, q.inputs), q.targets))(thetas)  # (R, Q)
    outputs = vmap(lambda th: problem.model(th, eval_inputs))(thetas)
    problem.counter.add("forward", Delta.shape[0] * (len(q) + eval_inputs.shape[0]))
    return (losses - base).T.detach(), outputs.detach()


def ground_truth_fingerprint(task: Task, scale: str, settings: SolverSettings) -> dict:
    return {
        "model": task.fingerprint(scale),
        "ground_truth": dataclasses.asdict(task.ground_truth_config(scale)),
        "solver": dataclasses.asdict(settings),
        "responses": list(RESPONSES),
        "version": GROUND_TRUTH_VERSION,
    }


def solver_settings(task: Task, scale: str) -> SolverSettings:
    cfg = task.ground_truth_config(scale)
    return SolverSettings(dense_max_params=cfg.dense_max_params, linear_rtol=cfg.linear_rtol,
                          pbrf_tol=cfg.pbrf_tol, pbrf_max_steps=cfg.pbrf_max_steps)


def compute_ground_truth(problem: Problem, removed: Tensor, eval_idx: Tensor, settings: SolverSettings) -> dict:
    """Solve the linearized PBRF and the PBRF for every removed example, all at once."""
    start = time.perf_counter()
    curvature = DampedGaussNewton(problem, problem.weight_decay + problem.damping, settings)
    eval_inputs = problem.train.inputs[eval_idx]
    responses = {}
    for name, solve in (("linear", linearized_pbrf), ("pbrf", pbrf)):
        Delta, certificate = solve(problem, removed, curvature)
        scores, outputs = stacked_evaluations(problem, Delta, eval_inputs)
        certificate["parameter_change_norm"] = torch.linalg.vector_norm(Delta, dim=-1).tolist()
        responses[name] = {"scores": scores.cpu(), "outputs": outputs.cpu(), "certificate": certificate}
    return {
        "removed": removed.cpu(), "eval_idx": eval_idx.cpu(),
        "base_outputs": problem.outputs(eval_inputs).cpu(), "responses": responses,
        "seconds": time.perf_counter() - start, "settings": dataclasses.asdict(settings),
    }


def load_ground_truth(task: Task, scale: str, problem: Problem, cache: Cache) -> tuple[GroundTruth, bool]:
    """The cached ground truth of (task, scale), computed first if needed -> (truth, was_cached)."""
    cfg = task.ground_truth_config(scale)
    settings = solver_settings(task, scale)
    seed = task.recipe(scale).seed
    removed = seeded_choice(problem.n_train, cfg.n_removed, seed=seed + 2).to(problem.device)
    eval_idx = seeded_choice(problem.n_train, cfg.n_eval, seed=seed + 3).to(problem.device)
    fingerprint = ground_truth_fingerprint(task, scale, settings)
    value, cached = cache.get_or_compute("ground_truth", f"{task.name}-{scale}", fingerprint,
                                         lambda: compute_ground_truth(problem, removed, eval_idx, settings))
    problem.counter.reset()
    return GroundTruth(key=content_key(fingerprint), **value), cached
