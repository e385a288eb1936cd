"""Response functions by retraining: cold-start, warm-start and proximal warm-start (DESIGN.md §1).

For removed training example m (ε = 1/N) the objective is the training objective with m left out,

  J_m(θ) = (1/N) Σᵢ wᵢ ℓᵢ(θ) + (wd/2)‖θ‖²  [+ (λ/2)‖θ − θˢ‖² for `proximal`],  wₘ = 0, wᵢ = 1 otherwise,

and the three retrainings differ in where they start and how long they run:

  cold      from θ⁰ (the initialisation θˢ was trained from), the base recipe: same seed, same
            batch order, m left out of its minibatch (training.sgd with weights)
  warm      from θˢ, K = recipe.epochs // 2 epochs of the same recipe (first K epochs of its
            batch order and learning-rate schedule; the optimizer state (momentum, Adam's
            moments) starts at zero)
  proximal  warm plus (λ/2)‖θ − θˢ‖², λ = problem.damping

For recipe.optimizer == "lbfgs" (the convex logistic-regression tasks) every retraining is
full-batch L-BFGS to convergence instead (cold from θ⁰, warm and proximal from θˢ), one
removed example at a time, polished by a few Newton steps on the exact Hessian when d is small:
torch's strong-Wolfe line search stalls near ‖∇J‖ ≈ 1e-9, above the ε-sized effect's precision.

Models with batch norm: warm and proximal retraining run in eval mode, running statistics
frozen at θˢ (like every other response function: they start from θˢ, where those statistics
belong). Cold retraining runs as the base training ran, in train mode from θ⁰ and the initial
running statistics, one row at a time (training.train_mode_minibatch; the removed example is
left out of its minibatch and of that batch's statistics), and each row keeps the running
statistics it ends with: a net retrained from scratch has statistics of its own, and in eval mode
from θ⁰ with θˢ's statistics (which belong to other weights) the ResNet-20 and VGG13 runs
diverged. Its control run repeats the base training exactly, so θ_ref = θˢ there.

All R removed examples are retrained at once: the parameters are stacked (R + 1, d) and
training.sgd vmaps over the rows. The extra last row is the *control run*: the same retraining
with nothing removed (all weights 1, same seed and batch order). Continuing to train moves θ
even with nothing removed (minibatch noise, non-convergence); the control run measures that
drift. Two variants of the scores follow (DESIGN.md §1):

  raw (`cold`, `warm`, `proximal`)       Δʳ[q, m] = ℓ_q(θʳ₋ₘ) − ℓ_q(θˢ)     (the paper's definition)
  controlled (`cold-controlled`, ...)   Δʳ[q, m] = ℓ_q(θʳ₋ₘ) − ℓ_q(θ_ref),  θ_ref the control run

and the controlled outputs are f(θˢ, x) + f(θʳ₋ₘ, x) − f(θ_ref, x) (the change relative to the
control run, placed on θˢ so that output distances to the other responses compare changes).
The raw variants are the main ones: they are the response functions of the paper (its Table 1,
Table 2 and Figure 4), and the decomposition's gaps are measured between them. Per-query
correlations are the same for both (the two differ by ℓ_q(θ_ref) − ℓ_q(θˢ), a constant per
query); pooled correlations and output distances differ, by the drift of the control run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, vmap

from tasks.base import Recipe

from .problem import Problem
from .training import PROGRESS_EVERY, log, sgd, sgd_halving_lr, stable_sgd_recipe, train_mode_minibatch

#: bump when a retraining changes in a way that changes its numbers (part of the cache key)
RETRAINING_VERSION = 1
KINDS = ("cold", "warm", "proximal")
#: response name -> (retraining kind, drift-controlled)
RESPONSES = {
    "cold": ("cold", False),
    "cold-controlled": ("cold", True),
    "warm": ("warm", False),
    "warm-controlled": ("warm", True),
    "proximal": ("proximal", False),
}
#: Newton polishing of L-BFGS retrainings is done when d is at most this (dense d×d Hessian)
NEWTON_MAX_PARAMS = 2048
NEWTON_MAX_STEPS = 8


@dataclass
class Retraining:
    """One retraining of every removed example plus the control run.

    thetas (R, d): θʳ₋ₘ; reference (d,): the control run θ_ref (nothing removed);
    certificate: how well each row solves its own objective (see `retrain`).
    """

    kind: str
    thetas: Tensor
    reference: Tensor
    certificate: dict
    #: each row's own running statistics (R + 1 dicts, the control run last), for a batch-norm
    #: net's train-mode cold retraining; None: every row uses the frozen statistics of θˢ
    buffers: list[dict[str, Tensor]] | None = None

    def parameter_change(self, problem: Problem, controlled: bool = False) -> Tensor:
        """θʳ₋ₘ − θˢ (raw) or θʳ₋ₘ − θ_ref (controlled), (R, d)."""
        return self.thetas - (self.reference if controlled else problem.params)


def removal_weights(problem: Problem, removed: Tensor, control: bool = True) -> Tensor:
    """Example weights (R [+ 1], N): row r leaves removed[r] out; the optional last row is all ones."""
    R = len(removed)
    W = torch.ones(R + int(control), problem.n_train, dtype=problem.dtype, device=problem.device)
    W[torch.arange(R, device=problem.device), removed] = 0.0
    return W


def objective_gradients(problem: Problem, thetas: Tensor, weights: Tensor, weight_decay: float,
                        proximal: tuple[float, Tensor] | None = None,
                        buffers: list[dict[str, Tensor]] | None = None) -> tuple[Tensor, Tensor]:
    """Values (R,) and full-batch gradients (R, d) of
    (1/N) Σᵢ W[r, i] ℓᵢ(θ_r) + (wd/2)‖θ_r‖² [+ (λ/2)‖θ_r − anchor‖²] for every row r
    (in eval mode; with `buffers`, row r with its own running statistics buffers[r])."""
    if buffers is not None:  # one row at a time: the rows are different functions
        parts = [_with_buffers(problem, b, lambda: objective_gradients(
            problem, thetas[r:r + 1], weights[r:r + 1], weight_decay, proximal)) for r, b in enumerate(buffers)]
        return torch.cat([v for v, _ in parts]), torch.cat([g for _, g in parts])
    p = problem
    n, cs = p.n_train, p.chunk_size
    value = torch.zeros(thetas.shape[0], dtype=thetas.dtype, device=thetas.device)
    gradient = torch.zeros_like(thetas)
    for s in range(0, n, cs):
        x, t = p.train.inputs[s:s + cs], p.train.targets[s:s + cs]

        def data_term(th: Tensor, w: Tensor) -> Tensor:
            return (w * p.loss(p.model(th, x), t)).sum()

        g, v = vmap(grad_and_value(data_term))(thetas, weights[:, s:s + cs])
        gradient, value = gradient + g.detach(), value + v.detach()
    p.counter.add("gradient", n * thetas.shape[0])
    value = value / n + 0.5 * weight_decay * thetas.pow(2).sum(1)
    gradient = gradient / n + weight_decay * thetas
    if proximal is not None:
        lam, anchor = proximal
        value = value + 0.5 * lam * (thetas - anchor).pow(2).sum(1)
        gradient = gradient + lam * (thetas - anchor)
    return value, gradient


def _with_buffers(problem: Problem, buffers: dict[str, Tensor], fn):
    """fn() with the model's frozen statistics temporarily replaced by `buffers`."""
    frozen = problem.model.buffers
    problem.model.buffers = buffers
    try:
        return fn()
    finally:
        problem.model.buffers = frozen


def _train_mode_cold(problem: Problem, weights: Tensor, recipe: Recipe) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """Cold retraining of a batch-norm net as its base training ran: train mode from θ⁰ and the
    initial running statistics, one row of weights (R + 1, N) at a time (a row of ones, the
    control run, is the base training itself) -> θ (R + 1, d) and each row's final statistics."""
    start = (problem.theta0).to(problem.device, problem.dtype)
    initial = problem.model.initial_buffers()
    thetas, buffers = [], []
    begin = last = time.perf_counter()
    for r in range(weights.shape[0]):
        w = None if bool((weights[r] == 1).all()) else weights[r]
        theta, buf = train_mode_minibatch(problem.model, problem.loss, problem.train, start, recipe,
                                          weights=w, buffers=initial)
        thetas.append(theta)
        buffers.append(buf)
        if time.perf_counter() - last > PROGRESS_EVERY or r + 1 == weights.shape[0]:
            last = time.perf_counter()
            elapsed = last - begin
            log.info("%s cold retraining (train mode): %d/%d rows, %.0f s, about %.0f s left", problem.task, r + 1,
                     weights.shape[0], elapsed, elapsed * (weights.shape[0] - r - 1) / (r + 1))
    return torch.stack(thetas), buffers


def _objective_hessian(problem: Problem, theta: Tensor, w: Tensor, weight_decay: float,
                       proximal: tuple[float, Tensor] | None) -> Tensor:
    """The dense Hessian (d, d) of one row's objective (small d only)."""
    p = problem
    d = theta.numel()
    H = torch.zeros(d, d, dtype=theta.dtype, device=theta.device)
    for s in range(0, p.n_train, p.chunk_size):
        x, t, ws = p.train.inputs[s:s + p.chunk_size], p.train.targets[s:s + p.chunk_size], w[s:s + p.chunk_size]
        H += torch.func.hessian(lambda th: (ws * p.loss(p.model(th, x), t)).sum())(theta).detach()
    p.counter.add("hvp", p.n_train * d)
    shift = weight_decay + (proximal[0] if proximal is not None else 0.0)
    return H / p.n_train + shift * torch.eye(d, dtype=theta.dtype, device=theta.device)


def _lbfgs_row(problem: Problem, start: Tensor, w: Tensor, recipe: Recipe,
               proximal: tuple[float, Tensor] | None, grad_tol: float) -> tuple[Tensor, int, int]:
    """Full-batch L-BFGS (strong Wolfe) on one row's objective, then Newton polishing.
    Returns (θ, L-BFGS iterations, accepted Newton steps)."""
    wd = recipe.weight_decay
    th = start.detach().clone().requires_grad_(True)
    # tolerance_change: stop when the line search no longer changes the objective (stalled)
    opt = torch.optim.LBFGS([th], lr=1.0, max_iter=recipe.epochs, history_size=50,
                            tolerance_grad=grad_tol / max(th.numel(), 1) ** 0.5, tolerance_change=1e-300,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value, g = objective_gradients(problem, th.detach()[None], w[None], wd, proximal)
        th.grad = g[0]
        return value[0]

    opt.step(closure)
    iterations = int(opt.state[opt._params[0]].get("n_iter", 0))
    theta = th.detach()
    newton = 0
    if theta.numel() <= NEWTON_MAX_PARAMS:
        _, g = objective_gradients(problem, theta[None], w[None], wd, proximal)
        gnorm = float(g.norm())
        for _ in range(NEWTON_MAX_STEPS):
            if gnorm <= grad_tol * 1e-3:
                break
            H = _objective_hessian(problem, theta, w, wd, proximal)
            try:
                step = torch.linalg.solve(H, g[0])
            except RuntimeError:  # singular: keep the L-BFGS point
                break
            trial = theta - step
            _, g_trial = objective_gradients(problem, trial[None], w[None], wd, proximal)
            if not float(g_trial.norm()) < gnorm:
                break
            theta, g, gnorm, newton = trial, g_trial, float(g_trial.norm()), newton + 1
    return theta, iterations, newton


def retrain(problem: Problem, removed: Tensor, recipe: Recipe, kind: str, *, tol: float = 1e-8,
            weights: Tensor | None = None) -> Retraining:
    """Retrain (`kind` in cold, warm, proximal) without each example of `removed` (R,), plus the
    control run with nothing removed, all rows at once -> Retraining.

    weights: optional (R + 1, N) example weights instead of `removal_weights(problem, removed)`
    (the last row is the control run); `removed` then only sets the certificate's scales.
    The certificate, per removed example: `relative_gradient_norm` = ‖∇J_m(θʳ₋ₘ)‖ / (ε‖∇ℓₘ(θˢ)‖)
    (the full-batch gradient of its own objective), `converged` (≤ tol), `status`, plus the
    epochs (SGD) or iterations (L-BFGS), the control run's drift and gradient, and the wall and
    CPU seconds of the retraining.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown retraining {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "cold" and problem.theta0 is None:
        raise ValueError("cold-start retraining needs the initialisation θ⁰ (problem.theta0), which this "
                         "problem does not have")
    start_time, start_cpu = time.perf_counter(), time.process_time()
    buffers = None
    W = removal_weights(problem, removed) if weights is None else weights.to(problem.dtype)
    rows = W.shape[0]
    start = (problem.theta0 if kind == "cold" else problem.params).to(problem.device, problem.dtype)
    proximal = (problem.damping, problem.params) if kind == "proximal" else None
    epochs = recipe.epochs if kind == "cold" else max(recipe.epochs // 2, 1)
    scale = problem.epsilon * torch.linalg.vector_norm(problem.train_gradients(removed), dim=-1)
    certificate: dict = {
        "kind": kind, "optimizer": recipe.optimizer, "start": "theta0" if kind == "cold" else "theta_s",
        "weight_decay": recipe.weight_decay, "proximal_strength": proximal[0] if proximal else 0.0,
        "tolerance": tol, "seed": recipe.seed,
    }
    batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in problem.model.module.modules())
    if recipe.optimizer in ("sgd", "adam"):
        if batch_norm and kind != "cold":
            # from θˢ in eval mode the net is sharper than in the train mode the lr was tuned on:
            # at the recipe's lr VGG13-MNIST's warm retraining (cpu) went to non-finite parameters
            recipe, stability = stable_sgd_recipe(problem, recipe)
            certificate.update(stability)
        if batch_norm and kind == "cold":
            thetas, buffers = _train_mode_cold(problem, W, recipe)
            certificate["batch_norm"] = ("train mode, as in base training, from the initial running statistics; "
                                         "each row evaluated with its own final statistics")
        elif kind == "cold":
            thetas = sgd(problem.model, problem.loss, problem.train, start.expand(rows, -1).clone(), recipe,
                         weights=W, epochs=epochs, progress=f"{problem.task} {kind} retraining of {rows} rows")
        else:
            label = f"{problem.task} {kind} retraining of {rows} rows"
            thetas, recipe, halvings = sgd_halving_lr(problem.model, problem.loss, problem.train,
                                                      start.expand(rows, -1).clone(), recipe, weights=W,
                                                      epochs=epochs, proximal=proximal, progress=label, what=label)
            certificate.update(halvings, lr=recipe.lr,
                               lr_factor=certificate.get("lr_factor", 1.0) * 0.5 ** halvings["lr_halvings"])
        if batch_norm and kind != "cold":
            certificate["batch_norm"] = "eval mode, running statistics frozen at theta_s"
        certificate.update({"epochs": epochs, "batch_size": recipe.batch_size or problem.n_train,
                            "batch_order": "the recipe's seed; a removed example is left out of its minibatch"})
        problem.counter.add("gradient", epochs * problem.n_train * rows)
    elif recipe.optimizer == "lbfgs":
        grad_tol = tol * float(scale.min())
        results = [_lbfgs_row(problem, start, W[r], recipe, proximal, grad_tol) for r in range(rows)]
        thetas = torch.stack([r[0] for r in results])
        certificate.update({"iterations": [r[1] for r in results[:-1]], "newton_steps": [r[2] for r in results[:-1]],
                            "max_iterations": recipe.epochs})
    else:
        raise ValueError(f"unknown optimizer {recipe.optimizer!r} in the recipe; use 'lbfgs', 'sgd' or 'adam'")
    if not torch.isfinite(thetas).all():
        why = (" in eval mode, batch-norm statistics frozen at θˢ (the network is sharper than in the "
               "train mode it was trained in, too sharp for the recipe's learning rate)"
               if "batch_norm" in certificate else "")
        raise FloatingPointError(f"{kind} retraining diverged (non-finite parameters){why}; recipe {recipe}")
    _, g = objective_gradients(problem, thetas, W, recipe.weight_decay, proximal, buffers)
    gnorm = torch.linalg.vector_norm(g, dim=-1)
    R = rows - 1
    rel = gnorm[:R] / scale
    converged = rel <= tol
    if recipe.optimizer != "lbfgs":
        status = ["converged" if c else "fixed_length" for c in converged.tolist()]
    else:
        status = ["converged" if c else "not_converged" for c in converged.tolist()]
    drift = thetas[R] - problem.params
    certificate.update({
        "relative_gradient_norm": rel.tolist(),
        "gradient_norm": gnorm[:R].tolist(),
        "converged": converged.tolist(),
        "status": status,
        "control": {
            "gradient_norm": float(gnorm[R]),
            "relative_gradient_norm": float(gnorm[R] / scale.mean()),
            "parameter_drift_norm": float(drift.norm()),
            "parameter_drift_relative": float(drift.norm() / (thetas[:R] - problem.params).norm(dim=-1).mean()
                                              .clamp_min(torch.finfo(problem.dtype).tiny)),
            **({"iterations": results[-1][1], "newton_steps": results[-1][2]}
               if recipe.optimizer == "lbfgs" else {}),
        },
        "base_gradient_norm": problem.training_certificate.get("gradient_norm"),
        "seconds": time.perf_counter() - start_time,
        # kept apart from "seconds", which the ground truth overwrites with the whole response's time
        "retraining_seconds": time.perf_counter() - start_time,
        "retraining_cpu_seconds": time.process_time() - start_cpu,
    })
    return Retraining(kind, thetas[:R].detach(), thetas[R].detach(), certificate, buffers)


def _response(problem: Problem, removed: Tensor, recipe: Recipe, kind: str, tol: float) -> tuple[Tensor, dict]:
    run = retrain(problem, removed, recipe, kind, tol=tol)
    return run.parameter_change(problem), {**run.certificate, "reference": "theta_s"}


def cold(problem: Problem, removed: Tensor, recipe: Recipe, tol: float = 1e-8) -> tuple[Tensor, dict]:
    """Cold-start retraining from θ⁰ with the base recipe -> Δ = θ − θˢ (R, d) and a certificate."""
    return _response(problem, removed, recipe, "cold", tol)


def warm(problem: Problem, removed: Tensor, recipe: Recipe, tol: float = 1e-8) -> tuple[Tensor, dict]:
    """Warm-start retraining from θˢ for half the base epochs -> Δ = θ − θˢ (R, d) and a certificate."""
    return _response(problem, removed, recipe, "warm", tol)


def proximal(problem: Problem, removed: Tensor, recipe: Recipe, tol: float = 1e-8) -> tuple[Tensor, dict]:
    """Warm start plus (λ/2)‖θ − θˢ‖² -> Δ = θ − θˢ (R, d) and a certificate."""
    return _response(problem, removed, recipe, "proximal", tol)


def evaluations(problem: Problem, run: Retraining, eval_inputs: Tensor, controlled: bool) -> tuple[Tensor, Tensor]:
    """Scores (Q, R) and outputs (R, n_eval, C) of a retraining.

    raw: ℓ_q(θʳ₋ₘ) − ℓ_q(θˢ) and f(θʳ₋ₘ, x); controlled: ℓ_q(θʳ₋ₘ) − ℓ_q(θ_ref) and
    f(θˢ, x) + f(θʳ₋ₘ, x) − f(θ_ref, x), exactly zero change where θʳ₋ₘ equals θ_ref.
    """
    q = problem.query
    # the reference goes through the same vmapped evaluation as the rows (bitwise comparable)
    thetas = torch.cat([run.thetas, (run.reference if controlled else problem.params)[None]])
    with torch.no_grad():
        if run.buffers is None:
            losses = vmap(lambda th: problem.loss(problem.model(th, q.inputs), q.targets))(thetas)  # (R + 1, Q)
            outputs = vmap(lambda th: problem.model(th, eval_inputs))(thetas)
        else:  # every row with its own running statistics; θˢ with its frozen ones
            own = [*run.buffers[:-1], run.buffers[-1] if controlled else None]
            losses = torch.stack([problem.loss(problem.model(th, q.inputs, b), q.targets) for th, b in zip(thetas, own)])
            outputs = torch.stack([problem.model(th, eval_inputs, b) for th, b in zip(thetas, own)])
        losses, ref_loss = losses[:-1], losses[-1]
        outputs, ref_outputs = outputs[:-1], outputs[-1]
        if controlled:
            outputs = problem.model(problem.params, eval_inputs) + (outputs - ref_outputs)
    problem.counter.add("forward", thetas.shape[0] * (len(q) + eval_inputs.shape[0]))
    return (losses - ref_loss).T.detach(), outputs.detach()


__all__ = ["RESPONSES", "KINDS", "Retraining", "retrain", "cold", "warm", "proximal", "evaluations",
           "objective_gradients", "removal_weights", "RETRAINING_VERSION"]
