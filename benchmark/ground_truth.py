"""Building a task's Problem (trained, cached) and its ground truth (solved, cached).

Ground truth, for R removed training examples and Q queries, per response function r:
  scores[q, m]   = ℓ_q(θʳ₋ₘ) − ℓ_q(θˢ)            (Q, R) test-loss differences
                   (− ℓ_q(θ_ref), the run with nothing removed, for cold- / warm-controlled)
  outputs[m]     = f(θʳ₋ₘ, x) on a fixed evaluation subset of the training inputs (R, n_eval, C)
  certificate    how accurately θʳ₋ₘ solves its problem.
and, with the PBRF (DESIGN.md §6), "pbrf-check": a second, independent solve of a seeded subset
of K removed examples (benchmark.second_solve): its scores (Q, K), certificate and the
disagreement with the first solve (relative error per example, the ceiling Pearson).
"""
from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor
from torch.func import vmap

from tasks.base import Recipe, Task

from . import retraining, second_solve, training
from .cache import Cache, content_key
from .problem import Batch, FunctionalModel, Problem
from .responses import (DampedGaussNewton, SolverSettings, ground_truth_curvature, linearized_pbrf, pbrf,
                        pbrf_epochs)
from .second_solve import SecondSolveSettings, disagreement, second_pbrf
from .training import Checkpoint, train, training_checkpoints

log = logging.getLogger("ifbench")

# Bump when the ground-truth computation changes in a way that changes its numbers.
GROUND_TRUTH_VERSION = 1
# The default set, computed with every ground truth. The retraining responses (cold, warm,
# proximal and the drift-controlled variants) are computed on first use instead
# (GroundTruth.response) and cached the same way: at cpu scale a cold-start retraining of an
# image MLP costs minutes, and only --ground-truth <retraining> and the decomposition need them.
#: the second, independent PBRF solve of a subset of the removed examples: the ground truth's
#: error bar (DESIGN.md §6); not a response function of its own (it covers K of the R examples)
SECOND_SOLVE = "pbrf-check"
RESPONSES = ("pbrf", "linear", SECOND_SOLVE)
#: the paper's PBRF protocol (the base optimizer on the PBRF objective for half the base epochs,
#: responses.pbrf_epochs), for where θˢ is no local minimum of the PBRF; computed on first use
PBRF_EPOCHS = "pbrf-epochs"
ALL_RESPONSES = ("pbrf", "linear", PBRF_EPOCHS, *retraining.RESPONSES)
#: epoch ends of the base training kept for TracIn-style estimators (Problem.checkpoints):
#: computed on first use by running the seeded base training again, and cached
CHECKPOINTS = 5
#: K, the removed examples solved a second time, where GroundTruthConfig.n_second_solve is unset
N_SECOND_SOLVE = {"smoke": 4, "cpu": 8, "paper": 8}
SECOND_SOLVE_SETTINGS = SecondSolveSettings()


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
    theta0, theta_s = trained["theta0"].to(device), trained["theta"].to(device)

    def checkpoints() -> list:
        """The base training run again from θ⁰, keeping CHECKPOINTS epoch ends (cached)."""
        def compute_checkpoints():
            kept, final = training_checkpoints(model, task.loss, train_data, theta0, recipe, CHECKPOINTS)
            difference = float((final - theta_s).norm() / theta_s.norm().clamp_min(1e-300))
            return {"checkpoints": [dataclasses.asdict(c) for c in kept], "theta_difference": difference}

        value, _ = cache.get_or_compute("checkpoints", f"{task.name}-{scale}",
                                        {**task.fingerprint(scale), "checkpoints": CHECKPOINTS}, compute_checkpoints)
        if value["theta_difference"] > 1e-6:
            warnings.warn(f"{task.name} at {scale}: rerunning the base training for its checkpoints ended "
                          f"{value['theta_difference']:.2e} (relative) away from the cached θˢ (trained on another "
                          "machine?): the checkpoints are of a neighbouring trajectory")
        return [Checkpoint(**c) for c in value["checkpoints"]]

    problem = Problem(
        task=task.name, scale=scale, model=model, params=theta_s,
        train=train_data, query=Batch(to(splits.x_query[query_idx]), to(splits.y_query[query_idx])),
        loss=task.loss, damping=task.damping_at(scale), weight_decay=recipe.weight_decay, seed=recipe.seed,
        theta0=theta0, training_certificate=trained["certificate"],
        **({"chunk_size": gt_cfg.example_chunk} if gt_cfg.example_chunk else {}),
    )
    problem.checkpoint_source = checkpoints
    check_base_model(problem)
    return problem


#: θˢ whose outputs vary across inputs by less than this (relative) did not train
COLLAPSED_SPREAD = 1e-4


def check_base_model(problem: Problem, n: int = 256) -> None:
    """Raise where θˢ gives (nearly) the same outputs for every training input (its first n):
    a collapsed base model (the class prior of a net whose signal vanished, say), on which every
    estimator correlates perfectly with every ground truth and no number means anything.
    Spread: mean over outputs of the std over inputs, relative to the outputs' RMS."""
    out = problem.outputs(problem.train.inputs[:n])
    spread = float(out.std(0).mean() / out.pow(2).mean().sqrt().clamp_min(torch.finfo(out.dtype).tiny))
    if len(out) > 1 and spread < COLLAPSED_SPREAD:
        loss = float(problem.losses(problem.train.subset(torch.arange(len(out), device=out.device))).mean())
        raise ValueError(
            f"the base model θˢ of {problem.task} at {problem.scale} gives the same outputs for every training "
            f"input (relative spread {spread:.1e} < {COLLAPSED_SPREAD:g}, mean training loss {loss:.4g}): it did not "
            f"train, and no influence estimate on it means anything; fix the task's recipe or initialisation")


@dataclass
class GroundTruth:
    """Ground truth of one task at one scale. Tensors are on the CPU.

    removed (R,) training indices; eval_idx (n_eval,) training indices whose outputs are stored;
    base_outputs (n_eval, C) = f(θˢ, x); responses[name] = {"scores": (Q, R), "outputs":
    (R, n_eval, C), "certificate": dict}, and responses["pbrf-check"] the second solve of K of
    them (compute_second_solve); key: the cache keys it was stored under.
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
        if name not in self.responses and self.compute is not None and name in (*ALL_RESPONSES, SECOND_SOLVE):
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
_UNSET_IF_NONE = ("removed_chunk", "example_chunk", "n_second_solve", "second_solve_preconditioned")
#: SolverSettings fields left out of the cache key while unset (likewise)
_SOLVER_UNSET_IF_NONE = ("preconditioner_dtype", "gauss_newton_dtype", "nystrom_rank")
#: fields that change only the PBRF solve's path, so only the PBRF's key (and its second
#: solve's, through "first") holds them: the other responses keep theirs
_PBRF_ONLY = ("preconditioner_dtype", "gauss_newton_dtype")
#: fields that steer the curvature solves only: the linearized response's and the PBRF's keys
_CURVATURE_ONLY = ("nystrom_rank",)
#: fields that steer the second solve only: its key alone
_SECOND_SOLVE_ONLY = ("second_solve_preconditioned",)


def status_counts(statuses: list[str]) -> dict[str, int]:
    """How many removed examples ended with each status, in name order."""
    return {s: statuses.count(s) for s in sorted(set(statuses))}


def untrusted_rows(certificate: dict) -> np.ndarray:
    """Removed examples with no local solution of their response function, (R,) bool: the solve
    left the basin around θˢ, or ended with a larger gradient than it started from
    (relative gradient norm > 1); or, for a response with a trust rule of its own (a per-example
    "trusted" list in its certificate: pbrf-epochs), the rows it does not trust. They are left
    out of the correlations and counted."""
    if "trusted" in certificate:
        return ~np.asarray(certificate["trusted"], dtype=bool)
    statuses = certificate.get("status")
    rel = certificate.get("relative_gradient_norm")
    if statuses is None or rel is None:
        return np.zeros(0, dtype=bool)
    return np.array([s == "left_basin" or r > 1.0 for s, r in zip(statuses, rel)], dtype=bool)


def n_second_solve(task: Task, scale: str) -> int:
    """K = min(R, n_second_solve) removed examples solved a second time (0: none)."""
    cfg = task.ground_truth_config(scale)
    k = N_SECOND_SOLVE.get(scale, 8) if cfg.n_second_solve is None else cfg.n_second_solve
    return min(cfg.n_removed, k)


def response_fingerprint(task: Task, scale: str, response: str, settings: SolverSettings) -> dict:
    """What one response function's ground truth depends on (its cache key)."""
    def keyed(k: str, v, unset_if_none: tuple) -> bool:
        if k in unset_if_none and v is None:
            return False
        if k in _PBRF_ONLY:
            return response == "pbrf"
        if k in _SECOND_SOLVE_ONLY:
            return response == SECOND_SOLVE
        return response in ("linear", "pbrf") or k not in _CURVATURE_ONLY

    return {
        "model": task.fingerprint(scale),
        "ground_truth": {k: v for k, v in dataclasses.asdict(task.ground_truth_config(scale)).items()
                         if keyed(k, v, _UNSET_IF_NONE + _PBRF_ONLY + _CURVATURE_ONLY)},
        "solver": {k: v for k, v in dataclasses.asdict(settings).items()
                   if keyed(k, v, _SOLVER_UNSET_IF_NONE)},
        "response": response,
        "version": GROUND_TRUTH_VERSION,
        **({"retraining": retraining.RETRAINING_VERSION} if response in retraining.RESPONSES else {}),
        **({"stable_fraction": training.STABLE_FRACTION}
           if task.batch_norm and response in retraining.RESPONSES and retraining.RESPONSES[response][0] != "cold"
           else {}),
        **({"batch_norm": "train mode"}
           if task.batch_norm and response in retraining.RESPONSES and retraining.RESPONSES[response][0] == "cold"
           else {}),
        **({"pbrf_epochs": {"second_runs": n_second_solve(task, scale), "stable_fraction": training.STABLE_FRACTION}}
           if response == PBRF_EPOCHS else {}),
        **({"second_solve": {"n": n_second_solve(task, scale),
                             "settings": dataclasses.asdict(second_solve_settings(task, scale)),
                             "version": second_solve.VERSION,
                             "first": content_key(response_fingerprint(task, scale, "pbrf", settings))}}
           if response == SECOND_SOLVE else {}),
    }


def solver_settings(task: Task, scale: str) -> SolverSettings:
    cfg = task.ground_truth_config(scale)
    return SolverSettings(dense_max_params=cfg.dense_max_params, linear_rtol=cfg.linear_rtol,
                          pbrf_tol=cfg.pbrf_tol, pbrf_max_steps=cfg.pbrf_max_steps,
                          preconditioner_dtype=cfg.preconditioner_dtype, gauss_newton_dtype=cfg.gauss_newton_dtype,
                          nystrom_rank=cfg.nystrom_rank)


class _LazyCurvature:
    """The damped Gauss–Newton solver, built only when a response needs computing."""

    def __init__(self, problem: Problem, settings: SolverSettings):
        self.problem, self.settings, self.value = problem, settings, None

    def __call__(self) -> DampedGaussNewton:
        if self.value is None:
            self.value = ground_truth_curvature(self.problem, self.settings)
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
                     chunk: int | None = None, second_runs: int = 0) -> dict:
    """One response function for every removed example: scores, outputs and certificate.

    The retraining responses and pbrf-epochs need the task's `recipe`; `runs` (kind ->
    Retraining) shares one retraining between its raw and drift-controlled variants. `chunk`:
    the PBRF and linearized PBRF are solved (and evaluated) for this many removed examples at a
    time (memory). second_runs: pbrf-epochs runs this many of them again with another batch
    order, its error bar (certificate["second_run"])."""
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
    elif name == PBRF_EPOCHS:
        if recipe is None:
            raise ValueError(f"the {name!r} response runs the base optimizer: pass the task's recipe")
        log.info("%s %s ground truth: %d removed examples", problem.task, name, len(removed))
        Delta, certificate = pbrf_epochs(problem, removed, recipe)
        scores, outputs = stacked_evaluations(problem, Delta, problem.train.inputs[eval_idx])
        if second_runs:
            certificate["second_run"] = pbrf_epochs_replicate(problem, removed, recipe, scores, certificate,
                                                              second_runs)
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


def pbrf_epochs_replicate(problem: Problem, removed: Tensor, recipe: Recipe, scores: Tensor, certificate: dict,
                          k: int) -> dict:
    """pbrf-epochs' error bar: K = min(R, k) seeded removed examples run again with another
    batch order (recipe seed + 1); their disagreement with the first run (second_solve.disagreement
    over the examples both runs trust) is the minibatch noise of the protocol, in score space."""
    positions = seeded_choice(len(removed), k, recipe.seed + 4)
    again = dataclasses.replace(recipe, seed=recipe.seed + 1)
    Delta, cert = pbrf_epochs(problem, removed[positions.to(removed.device)], again)
    second, _ = stacked_evaluations(problem, Delta, problem.train.inputs[:1])
    trusted = ~untrusted_rows(cert) & ~untrusted_rows(certificate)[positions.numpy()]
    summary = disagreement(scores[:, positions].cpu().numpy(), second.cpu().numpy(), trusted, seed=problem.seed)
    return error_bar(summary, removed[positions.to(removed.device)], "pbrf-epochs again with batch-order seed + 1",
                     cert)


def error_bar(summary: dict, removed, method: str, certificate: dict) -> dict:
    """A ground truth's error bar as reported: the disagreement `summary` of its second solve
    (or run) with the first, which removed examples it covers, how it was computed, and how
    that second solve ended (its own certificate)."""
    return {**summary, "removed": [int(i) for i in removed], "method": method,
            "converged_fraction": float(np.mean(certificate["converged"])),
            "max_relative_gradient_norm": float(np.max(certificate["relative_gradient_norm"])),
            "status_counts": status_counts(certificate["status"]), "seconds": certificate["seconds"]}


def second_solve_settings(task: Task, scale: str) -> SecondSolveSettings:
    """The second solve's L-BFGS settings: second_solve.PRECONDITIONED where the task asks for
    H₀ = (G + μI)⁻¹ (GroundTruthConfig.second_solve_preconditioned), else SECOND_SOLVE_SETTINGS."""
    return second_solve.PRECONDITIONED if task.ground_truth_config(scale).second_solve_preconditioned \
        else SECOND_SOLVE_SETTINGS


def second_solve_preconditioner(task: Task, scale: str, curvature: _LazyCurvature) -> Callable[[Tensor], Tensor] | None:
    """(G + μI)⁻¹ from the ground truth's own solver where the task asks for a preconditioned
    second solve (GroundTruthConfig.second_solve_preconditioned), else None."""
    if not task.ground_truth_config(scale).second_solve_preconditioned:
        return None
    solve = curvature().approximate_solve()
    if solve is None:
        raise ValueError(f"{task.name} at {scale}: second_solve_preconditioned needs a dense Gauss–Newton solve "
                         f"(d ≤ dense_max_params) or nystrom_rank; set one of them, or unset it")
    return solve


def compute_second_solve(problem: Problem, removed: Tensor, eval_idx: Tensor, first: dict, k: int, seed: int,
                         tol: float, settings: SecondSolveSettings = SECOND_SOLVE_SETTINGS,
                         precondition: Callable[[Tensor], Tensor] | None = None) -> dict:
    """The PBRF of K = min(R, k) seeded removed examples solved again (benchmark.second_solve) and
    compared with the first solve `first` (the "pbrf" response: scores (Q, R), certificate).
    precondition: (G + μI)⁻¹ for L-BFGS's H₀ (second_solve.second_pbrf).

    Returns {"positions": (K,) indices into `removed`, "removed": (K,) training indices,
    "scores": (Q, K), "outputs": (K, n_eval, C), "certificate": the second solve's,
    "summary": second_solve.disagreement over the examples both solves trust}."""
    start = time.perf_counter()
    positions = seeded_choice(len(removed), k, seed)
    subset = removed[positions.to(removed.device)]
    Delta, certificate = second_pbrf(problem, subset, tol, settings, precondition)
    scores, outputs = stacked_evaluations(problem, Delta, problem.train.inputs[eval_idx])
    bad_first, bad_second = untrusted_rows(first["certificate"]), untrusted_rows(certificate)
    trusted = ~bad_second & (~bad_first[positions.numpy()] if bad_first.size else True)
    summary = disagreement(first["scores"][:, positions].numpy(), scores.cpu().numpy(), trusted, seed=problem.seed)
    certificate["parameter_change_norm"] = torch.linalg.vector_norm(Delta, dim=-1).tolist()
    certificate["seconds"] = time.perf_counter() - start
    return {"positions": positions, "removed": subset.cpu(), "scores": scores.cpu(), "outputs": outputs.cpu(),
            "certificate": certificate, "summary": summary}


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

    def compute(name: str) -> dict:
        if name == SECOND_SOLVE:
            return compute_second_solve(problem, removed, eval_idx, load("pbrf")[0], n_second_solve(task, scale),
                                        seed + 4, settings.pbrf_tol, second_solve_settings(task, scale),
                                        second_solve_preconditioner(task, scale, curvature))
        return compute_response(problem, name, removed, eval_idx, curvature, recipe, runs, cfg.removed_chunk,
                                second_runs=n_second_solve(task, scale))

    def load(name: str, siblings: bool = True) -> tuple[dict, str, bool]:
        fingerprint = response_fingerprint(task, scale, name, settings)
        value, cached = cache.get_or_compute("ground_truth", f"{task.name}-{scale}-{name}", fingerprint,
                                             lambda: compute(name))
        if not cached and siblings and name in retraining.RESPONSES:  # store the other variant of the same run
            for other, (kind, _) in retraining.RESPONSES.items():
                if kind == retraining.RESPONSES[name][0] and other != name:
                    load(other, siblings=False)
        return value, content_key(fingerprint), cached

    start = time.perf_counter()
    values, keys, all_cached = {}, {}, True
    for name in responses:
        if name == SECOND_SOLVE and n_second_solve(task, scale) == 0:
            continue
        values[name], keys[name], cached = load(name)
        all_cached &= cached
    truth = GroundTruth(
        removed=removed.cpu(), eval_idx=eval_idx.cpu(), base_outputs=problem.outputs(problem.train.inputs[eval_idx]).cpu(),
        responses=values, key=",".join(f"{k}:{v}" for k, v in keys.items()), seconds=time.perf_counter() - start,
        settings=dataclasses.asdict(settings), compute=lambda name: load(name)[:2])
    problem.counter.reset()
    return truth, all_cached
