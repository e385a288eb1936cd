"""Building a task's Problem (trained, cached) and its ground truth (solved, cached).

Ground truth, for R removed training examples and Q queries, per response function r:
  scores[q, m]   = ℓ_q(θʳ₋ₘ) − ℓ_q(θˢ)            (Q, R) test-loss differences
                   (− ℓ_q(θ_ref), the run with nothing removed, for cold- / warm-controlled)
  outputs[m]     = f(θʳ₋ₘ, x) on a fixed evaluation subset of the training inputs (R, n_eval, C)
  certificate    how accurately θʳ₋ₘ solves its problem.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from torch.func import vmap

from tasks.base import Recipe, Task

from . import retraining
from .cache import Cache, content_key
from .problem import Batch, FunctionalModel, Problem
from .responses import DampedGaussNewton, SolverSettings, linearized_pbrf, pbrf
from .training import train

log = logging.getLogger("ifbench")

# Bump when the ground-truth computation changes in a way that changes its numbers.
GROUND_TRUTH_VERSION = 1
# The default set, computed with every ground truth. The retraining responses (cold, warm,
# proximal and the drift-controlled variants) are computed on first use instead
# (GroundTruth.response) and cached the same way: at cpu scale a cold-start retraining of an
# image MLP costs minutes, and only --ground-truth <retraining> and the decomposition need them.
RESPONSES = ("pbrf", "linear")
ALL_RESPONSES = ("pbrf", "linear", *retraining.RESPONSES)


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
        value = {"theta0": trained.theta0.cpu(), "theta": trained.theta.cpu(), "certificate": trained.certificate}
        if trained.buffers is not None:  # batch-norm running statistics at θˢ, frozen from here on
            value["buffers"] = {k: b.cpu() for k, b in trained.buffers.items()}
        return value

    trained, _ = cache.get_or_compute("models", f"{task.name}-{scale}", task.fingerprint(scale), compute)
    if "buffers" in trained:
        model.set_buffers(trained["buffers"])
    query_idx = seeded_choice(len(splits.x_query), gt_cfg.n_query, seed=recipe.seed + 1)
    problem = Problem(
        task=task.name, scale=scale, model=model, params=trained["theta"].to(device),
        train=train_data, query=Batch(to(splits.x_query[query_idx]), to(splits.y_query[query_idx])),
        loss=task.loss, damping=task.damping, weight_decay=recipe.weight_decay, seed=recipe.seed,
        theta0=trained["theta0"].to(device), training_certificate=trained["certificate"],
        **({"chunk_size": gt_cfg.example_chunk} if gt_cfg.example_chunk else {}),
    )
    return problem


@dataclass
class GroundTruth:
    """Ground truth of one task at one scale. Tensors are on the CPU.

    removed (R,) training indices; eval_idx (n_eval,) training indices whose outputs are stored;
    base_outputs (n_eval, C) = f(θˢ, x); responses[name] = {"scores": (Q, R), "outputs":
    (R, n_eval, C), "certificate": dict}; key: the cache key it was stored under.
    A response of ALL_RESPONSES not loaded yet is loaded or computed (and cached) on first use.
    """

    removed: Tensor
    eval_idx: Tensor
    base_outputs: Tensor
    responses: dict
    key: str
    seconds: float
    settings: dict
    compute: Callable[[str], tuple[dict, str]] | None = dataclasses.field(default=None, repr=False)

    def scores(self, response: str = "pbrf") -> Tensor:
        return self.response(response)["scores"]

    def response(self, name: str) -> dict:
        if name not in self.responses and self.compute is not None and name in ALL_RESPONSES:
            self.responses[name], key = self.compute(name)
            self.key = f"{self.key},{name}:{key}"
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


#: GroundTruthConfig fields left out of the cache key while unset (keys from before they existed)
_UNSET_IF_NONE = ("removed_chunk", "example_chunk")
#: SolverSettings fields left out of the cache key while unset (likewise)
_SOLVER_UNSET_IF_NONE = ("preconditioner_dtype",)


def response_fingerprint(task: Task, scale: str, response: str, settings: SolverSettings) -> dict:
    """What one response function's ground truth depends on (its cache key)."""
    return {
        "model": task.fingerprint(scale),
        "ground_truth": {k: v for k, v in dataclasses.asdict(task.ground_truth_config(scale)).items()
                         if not (k in _UNSET_IF_NONE and v is None)},
        "solver": {k: v for k, v in dataclasses.asdict(settings).items()
                   if not (k in _SOLVER_UNSET_IF_NONE and v is None)},
        "response": response,
        "version": GROUND_TRUTH_VERSION,
        **({"retraining": retraining.RETRAINING_VERSION} if response in retraining.RESPONSES else {}),
    }


def solver_settings(task: Task, scale: str) -> SolverSettings:
    cfg = task.ground_truth_config(scale)
    return SolverSettings(dense_max_params=cfg.dense_max_params, linear_rtol=cfg.linear_rtol,
                          pbrf_tol=cfg.pbrf_tol, pbrf_max_steps=cfg.pbrf_max_steps)


class _LazyCurvature:
    """The damped Gauss–Newton solver, built only when a response needs computing."""

    def __init__(self, problem: Problem, settings: SolverSettings):
        self.problem, self.settings, self.value = problem, settings, None

    def __call__(self) -> DampedGaussNewton:
        if self.value is None:
            p = self.problem
            self.value = DampedGaussNewton(p, p.weight_decay + p.damping, self.settings)
        return self.value


def merge_certificates(parts: list[dict]) -> dict:
    """One certificate from those of consecutive chunks of removed examples: per-example lists
    concatenated, counts and times summed, maxima and flags combined; the first chunk's value
    of anything else (settings such as the tolerance)."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    for key, first in parts[0].items():
        values = [p.get(key) for p in parts]
        if isinstance(first, list):
            out[key] = [v for part in values for v in part]
        elif isinstance(first, bool):
            out[key] = all(values)
        elif key.startswith("max_"):
            out[key] = max(values)
        elif isinstance(first, (int, float)) and (key in ("iterations", "inner_iterations", "seconds")):
            out[key] = sum(values)
        else:
            out[key] = first
    out["removed_chunks"] = len(parts)
    return out


def compute_response(problem: Problem, name: str, removed: Tensor, eval_idx: Tensor,
                     curvature: _LazyCurvature, recipe: Recipe | None = None, runs: dict | None = None,
                     chunk: int | None = None) -> dict:
    """One response function for every removed example: scores, outputs and certificate.

    The retraining responses need the task's `recipe`; `runs` (kind -> Retraining) shares one
    retraining between its raw and drift-controlled variants. `chunk`: the PBRF and linearized
    PBRF are solved (and evaluated) for this many removed examples at a time (memory)."""
    start = time.perf_counter()
    if name in ("linear", "pbrf"):
        solve = {"linear": linearized_pbrf, "pbrf": pbrf}[name]
        size = chunk or len(removed)
        parts = []
        for s in range(0, len(removed), size):
            parts.append(solve(problem, removed[s:s + size], curvature()))
            log.info("%s %s ground truth: %d/%d removed examples done, %.1f s", problem.task, name,
                     min(s + size, len(removed)), len(removed), time.perf_counter() - start)
        Delta, certificate = torch.cat([p[0] for p in parts]), merge_certificates([p[1] for p in parts])
        evaluated = [stacked_evaluations(problem, Delta[s:s + size], problem.train.inputs[eval_idx])
                     for s in range(0, len(removed), size)]
        scores, outputs = torch.cat([e[0] for e in evaluated], 1), torch.cat([e[1] for e in evaluated])
    elif name in retraining.RESPONSES:
        if recipe is None:
            raise ValueError(f"the {name!r} response retrains the model: pass the task's recipe")
        kind, controlled = retraining.RESPONSES[name]
        runs = {} if runs is None else runs
        if kind not in runs:
            log.info("%s %s ground truth: retraining %d removed examples (%s)", problem.task, name, len(removed), kind)
            runs[kind] = retraining.retrain(problem, removed, recipe, kind, tol=curvature.settings.pbrf_tol)
        run = runs[kind]
        Delta = run.parameter_change(problem, controlled)
        certificate = {**run.certificate, "reference": "control run (nothing removed)" if controlled else "theta_s"}
        scores, outputs = retraining.evaluations(problem, run, problem.train.inputs[eval_idx], controlled)
    else:
        raise KeyError(f"unknown response function {name!r}; known: {', '.join(ALL_RESPONSES)}")
    certificate["parameter_change_norm"] = torch.linalg.vector_norm(Delta, dim=-1).tolist()
    certificate["seconds"] = time.perf_counter() - start
    log.info("%s %s ground truth: done, %.1f s", problem.task, name, certificate["seconds"])
    return {"scores": scores.cpu(), "outputs": outputs.cpu(), "certificate": certificate}


def load_ground_truth(task: Task, scale: str, problem: Problem, cache: Cache,
                      responses: tuple[str, ...] = RESPONSES) -> tuple[GroundTruth, bool]:
    """The ground truth of (task, scale), each response function loaded from the cache or
    computed and stored -> (truth, every response was cached)."""
    cfg = task.ground_truth_config(scale)
    settings = solver_settings(task, scale)
    seed = task.recipe(scale).seed
    removed = seeded_choice(problem.n_train, cfg.n_removed, seed=seed + 2).to(problem.device)
    eval_idx = seeded_choice(problem.n_train, cfg.n_eval, seed=seed + 3).to(problem.device)
    curvature = _LazyCurvature(problem, settings)
    recipe, runs = task.recipe(scale), {}

    def load(name: str, siblings: bool = True) -> tuple[dict, str, bool]:
        fingerprint = response_fingerprint(task, scale, name, settings)
        value, cached = cache.get_or_compute(
            "ground_truth", f"{task.name}-{scale}-{name}", fingerprint,
            lambda: compute_response(problem, name, removed, eval_idx, curvature, recipe, runs, cfg.removed_chunk))
        if not cached and siblings and name in retraining.RESPONSES:  # store the other variant of the same run
            for other, (kind, _) in retraining.RESPONSES.items():
                if kind == retraining.RESPONSES[name][0] and other != name:
                    load(other, siblings=False)
        return value, content_key(fingerprint), cached

    start = time.perf_counter()
    values, keys, all_cached = {}, {}, True
    for name in responses:
        values[name], keys[name], cached = load(name)
        all_cached &= cached
    truth = GroundTruth(
        removed=removed.cpu(), eval_idx=eval_idx.cpu(), base_outputs=problem.outputs(problem.train.inputs[eval_idx]).cpu(),
        responses=values, key=",".join(f"{k}:{v}" for k, v in keys.items()), seconds=time.perf_counter() - start,
        settings=dataclasses.asdict(settings), compute=lambda name: load(name)[:2])
    problem.counter.reset()
    return truth, all_cached
