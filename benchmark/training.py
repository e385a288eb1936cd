"""Base training of a task's model: θ⁰ → θˢ with the task's recipe.

The objective is (1/N) Σᵢ wᵢ ℓᵢ(θ) + (wd/2)‖θ‖², with example weights w (all ones for the
base model; wₘ = 0 removes example m). Minibatch SGD estimates it without bias: the loss of a
batch B is (1/|B|) Σ_{i∈B} wᵢ ℓᵢ, so a removed example is left out of its own minibatch and
the batch order is the same with or without it. SGD works on stacked parameters (R, d) with
weights (R, N), vmapped, so several retrainings share one pass over the batches.

`sgd` also runs the recipe optimizer "adam" (Adam with L2 weight decay in the gradient, betas
ADAM_BETAS, eps ADAM_EPS). A model with batch norm is trained normally by `train` (train mode:
batch statistics in the forward pass, running statistics updated, one θ, not vmapped); its final
buffers are returned with θˢ and from then on frozen (eval mode) for everything else. Models
with convolutions take the same unvmapped loop for speed (train and eval mode agree there).
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from tasks.base import Recipe

from .linalg import top_eigenvalue
from .problem import Batch, FunctionalModel

log = logging.getLogger("ifbench")
#: sgd(progress=...) logs a line at most this often (seconds)
PROGRESS_EVERY = 10.0


class _Stderr(logging.Handler):
    """Writes each record to whatever sys.stderr is at the time (a stream captured once could close)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr, flush=True)


def show_progress() -> None:
    """Print the "ifbench" progress lines (retraining, PBRF steps, Gauss–Newton builds) on stderr,
    with the time of day: for the command-line tools (pytest shows them through its own logging)."""
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)


@dataclass(frozen=True)
class TrainedModel:
    """θ⁰ (d,), θˢ (d,), and how training ended (full-batch objective and gradient norm)."""

    theta0: Tensor
    theta: Tensor
    certificate: dict
    buffers: dict[str, Tensor] | None = None  # the module's buffers at θˢ (batch-norm running stats)


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


ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class _Update:
    """The recipe's parameter update from a gradient: SGD (optional momentum) or Adam."""

    def __init__(self, recipe: Recipe, theta: Tensor):
        if recipe.optimizer not in ("sgd", "adam"):
            raise ValueError(f"minibatch training needs optimizer 'sgd' or 'adam', not {recipe.optimizer!r}")
        self.recipe, self.steps = recipe, 0
        self.velocity = torch.zeros_like(theta)
        self.second = torch.zeros_like(theta) if recipe.optimizer == "adam" else None

    def __call__(self, theta: Tensor, g: Tensor, epoch: int) -> Tensor:
        lr = learning_rate(self.recipe, epoch)
        if self.second is None:
            self.velocity = self.recipe.momentum * self.velocity + g if self.recipe.momentum else g
            return theta - lr * self.velocity
        b1, b2 = ADAM_BETAS
        self.steps += 1
        self.velocity = b1 * self.velocity + (1 - b1) * g
        self.second = b2 * self.second + (1 - b2) * g * g
        m_hat = self.velocity / (1 - b1 ** self.steps)
        v_hat = self.second / (1 - b2 ** self.steps)
        return theta - lr * m_hat / (v_hat.sqrt() + ADAM_EPS)


def has_batch_norm(module: nn.Module) -> bool:
    """Whether the module keeps running statistics that training must update (batch norm)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in module.modules())


def _module_loop(module: nn.Module) -> bool:
    """Base training by `train_mode_minibatch` (one θ, not vmapped): needed with batch norm, and
    faster with convolutions (vmapping a single θ through a convolution costs about 6× more)."""
    return has_batch_norm(module) or any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


EpochEnd = Callable[[int, Tensor], None]  # (epoch, θ at its end)


def _epochs(n: int, batch_size: int, epochs: int, seed: int, on_epoch_end: EpochEnd | None, theta):
    """batch_order, calling on_epoch_end(epoch, theta()) after the last batch of every epoch."""
    previous = None
    for epoch, idx in batch_order(n, batch_size, epochs, seed):
        if on_epoch_end is not None and previous is not None and epoch != previous:
            on_epoch_end(previous, theta())
        previous = epoch
        yield epoch, idx
    if on_epoch_end is not None and previous is not None:
        on_epoch_end(previous, theta())


def train_mode_minibatch(model: FunctionalModel, loss, data: Batch, theta: Tensor,
                         recipe: Recipe, on_epoch_end: EpochEnd | None = None, *,
                         weights: Tensor | None = None,
                         buffers: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The recipe's SGD / Adam with the module in train mode (batch norm normalises by batch
    statistics and updates its running statistics), same batch order as `sgd`.

    weights (N,): optional example weights; a minibatch B then sees only its examples of nonzero
    weight (a removed example is not in its batch's statistics either) and its loss is
    (1/|B|) Σ_{i∈B} wᵢ ℓᵢ, as in `sgd`. buffers: the running statistics to start from (default
    the model's). Returns θ (d,) and the final buffers (the module itself is left in eval mode)."""
    buffers = {k: b.clone() for k, b in (model.buffers if buffers is None else buffers).items()}
    update = _Update(recipe, theta)
    theta = theta.clone()
    model.module.train()
    try:
        for epoch, idx in _epochs(len(data), recipe.batch_size or len(data), recipe.epochs, recipe.seed,
                                  on_epoch_end, lambda: theta):
            idx = idx.to(data.inputs.device)
            th = theta.detach().requires_grad_(True)
            if weights is None:
                out = functional_call(model.module, (model.unflatten(th), buffers), (data.inputs[idx],))
                value = loss(out, data.targets[idx]).mean()
            else:
                kept = idx[weights[idx] != 0]
                out = functional_call(model.module, (model.unflatten(th), buffers), (data.inputs[kept],))
                value = (weights[kept] * loss(out, data.targets[kept])).sum() / len(idx)
            value = value + 0.5 * recipe.weight_decay * th.pow(2).sum()
            (g,) = torch.autograd.grad(value, th)
            theta = update(theta, g, epoch)
    finally:
        model.module.eval()
    return theta.detach(), {k: b.detach() for k, b in buffers.items()}


#: a minibatch objective of one row: (θ (d,), weights of the batch (b,), inputs, targets,
#: *row_data) -> scalar
BatchObjective = Callable[..., Tensor]


def sgd(model: FunctionalModel, loss, data: Batch, theta: Tensor, recipe: Recipe, *,
        weights: Tensor | None = None, epochs: int | None = None, seed: int | None = None,
        proximal: tuple[float, Tensor] | None = None, on_epoch_end: EpochEnd | None = None,
        objective: BatchObjective | None = None, row_data: tuple[Tensor, ...] = (),
        progress: str | None = None) -> Tensor:
    """Minibatch SGD (with the recipe's momentum, learning-rate steps and weight decay), or Adam
    when recipe.optimizer == "adam". The model is evaluated in eval mode (buffers frozen).

    theta: (d,) or stacked (R, d); weights: (N,) or (R, N) example weights (default ones);
    proximal: optional (λ, anchor (d,)) adding (λ/2)‖θ − anchor‖²; on_epoch_end(epoch, θ) is
    called after every epoch (θ of theta's shape). Returns θ of theta's shape.
    objective: replaces the training objective (and `proximal`) by objective(θ_r, w_r[batch],
    x_batch, t_batch, *row_data_r), with row_data (R, ...) tensors vmapped along the rows.
    progress: a label; a run that lasts logs "label: epoch e/E, elapsed, estimate" on the
    "ifbench" logger every PROGRESS_EVERY seconds.
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

    step = vmap(grad(objective or batch_objective), in_dims=(0, 0, None, None, *(0,) * len(row_data)))
    update = _Update(recipe, theta)
    theta = theta.clone()
    shaped = (lambda: theta) if stacked else (lambda: theta[0])
    start = last = time.perf_counter()
    for epoch, idx in _epochs(n, recipe.batch_size or n, epochs, seed, on_epoch_end, shaped):
        idx = idx.to(data.inputs.device)
        g = step(theta, weights[:, idx], data.inputs[idx], data.targets[idx], *row_data)
        theta = update(theta, g, epoch)
        if progress is not None and time.perf_counter() - last > PROGRESS_EVERY:
            last = time.perf_counter()
            elapsed = last - start
            log.info("%s: epoch %d/%d, %.0f s, about %.0f s left", progress, epoch + 1, epochs, elapsed,
                     elapsed * (epochs - epoch - 1) / (epoch + 1))
    return theta if stacked else theta[0]


#: stable_sgd_recipe keeps SGD at most this fraction of heavy-ball's stability limit 2(1 + β)/L
STABLE_FRACTION = 0.5
#: sgd_halving_lr reruns a diverged run at most this many times, each with half the learning rate
MAX_LR_HALVINGS = 3


class _NonFinite(Exception):
    """Raised at the end of the epoch in which a run's parameters stopped being finite."""


def _stop_if_not_finite(epoch: int, theta: Tensor) -> None:
    if not torch.isfinite(theta).all():
        raise _NonFinite(epoch)


def sgd_halving_lr(model: FunctionalModel, loss, data: Batch, theta: Tensor, recipe: Recipe, *, what: str,
                   **kwargs) -> tuple[Tensor, Recipe, dict]:
    """`sgd(model, loss, data, theta, recipe, **kwargs)`, stopped at the end of any epoch after
    which a parameter is non-finite and rerun from `theta` with the whole learning-rate schedule
    halved, at most MAX_LR_HALVINGS times (for the runs from θˢ in eval mode: the stability
    limit of stable_sgd_recipe is measured at θˢ, and the curvature can grow along the run).
    A run that stays finite is exactly sgd's. -> (θ, the recipe that ran, {"lr_halvings": k,
    "diverged_at_epoch": [the epoch, from 1, after which each diverged run stopped]}).
    Raises FloatingPointError naming `what` and every learning rate tried when the last run
    diverges too."""
    if "on_epoch_end" in kwargs:
        raise TypeError("sgd_halving_lr watches the end of every epoch itself; on_epoch_end is not supported")
    diverged: list[int] = []
    for halvings in range(MAX_LR_HALVINGS + 1):
        try:
            out = sgd(model, loss, data, theta, recipe, on_epoch_end=_stop_if_not_finite, **kwargs)
            return out, recipe, {"lr_halvings": halvings, "diverged_at_epoch": diverged}
        except _NonFinite as exc:
            diverged.append(int(exc.args[0]) + 1)  # counted from 1
            log.info("%s: non-finite parameters after epoch %d at lr %.3g; rerunning at lr %.3g",
                     what, diverged[-1], recipe.lr, recipe.lr / 2)
            if halvings < MAX_LR_HALVINGS:
                recipe = dataclasses.replace(recipe, lr=recipe.lr / 2)
    tried = ", ".join(f"{recipe.lr * 2 ** k:.3g}" for k in range(MAX_LR_HALVINGS, -1, -1))
    raise FloatingPointError(f"{what} diverged (non-finite parameters) at every learning rate tried ({tried}, "
                             f"after epochs {diverged})")


def stable_sgd_recipe(problem, recipe: Recipe) -> tuple[Recipe, dict]:
    """The recipe with its whole SGD learning-rate schedule scaled by
    min(1, STABLE_FRACTION · 2(1 + β) / (L · lr)), L = λ_max(G) + wd + λ at θˢ (30 power
    iterations, seeded by the recipe): heavy-ball SGD is stable on curvature L only for
    lr < 2(1 + β)/L. Runs from θˢ in eval mode need it on the batch-norm nets, whose frozen
    statistics make them sharper than the train-mode objective the lr was tuned on. Adam and
    L-BFGS recipes are returned unchanged. -> (recipe, {"lr", "lr_factor", "curvature_max"})."""
    if recipe.optimizer != "sgd":
        return recipe, {"lr": recipe.lr, "lr_factor": 1.0, "curvature_max": None}
    p = problem
    curvature_max = p.weight_decay + p.damping + top_eigenvalue(
        p.gnvp, p.n_params, p.dtype, p.device, 30, torch.Generator().manual_seed(recipe.seed))
    factor = min(1.0, STABLE_FRACTION * 2 * (1 + recipe.momentum) / (curvature_max * recipe.lr))
    recipe = dataclasses.replace(recipe, lr=recipe.lr * factor)
    return recipe, {"lr": recipe.lr, "lr_factor": factor, "curvature_max": curvature_max}


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
    buffers = None
    if recipe.optimizer == "lbfgs":
        theta = lbfgs(model, loss, data, theta0, recipe)
    elif recipe.optimizer in ("sgd", "adam") and _module_loop(model.module):
        theta, buffers = train_mode_minibatch(model, loss, data, theta0, recipe)
        if has_batch_norm(model.module):
            model.set_buffers(buffers)  # frozen at θˢ from here on (the certificate is in eval mode)
        else:
            buffers = None
    elif recipe.optimizer in ("sgd", "adam"):
        theta = sgd(model, loss, data, theta0, recipe)
    else:
        raise ValueError(f"unknown optimizer {recipe.optimizer!r} in the recipe; use 'lbfgs', 'sgd' or 'adam'")
    value, g = full_objective_gradient(model, loss, data, theta, recipe.weight_decay)
    certificate = {
        "objective": value,
        "gradient_norm": float(g.norm()),
        "seconds": time.perf_counter() - start,
    }
    if not torch.isfinite(theta).all():
        raise FloatingPointError(f"training diverged (non-finite parameters); recipe {recipe}")
    return TrainedModel(theta0, theta, certificate, buffers)


@dataclass(frozen=True)
class Checkpoint:
    """θ at the end of one epoch of base training (d,), and the weight TracIn gives it:
    weight = η · epochs / |B|, with η the learning rate of that epoch, `epochs` the epochs since
    the previous checkpoint and |B| the batch size (each of those epochs takes one step of size
    η / |B| along ∇ℓₘ). L-BFGS training has one checkpoint, θˢ, of weight ε = 1/N."""

    epoch: int
    theta: Tensor
    weight: float


def checkpoint_epochs(epochs: int, count: int) -> list[int]:
    """`count` evenly spaced epochs of range(epochs), the last one included (0-based, sorted)."""
    count = max(1, min(count, epochs))
    return sorted({round((i + 1) * epochs / count) - 1 for i in range(count)})


def training_checkpoints(model: FunctionalModel, loss, data: Batch, theta0: Tensor, recipe: Recipe,
                         count: int) -> tuple[list[Checkpoint], Tensor]:
    """Run the base training from θ⁰ again, keeping θ at `count` evenly spaced epoch ends.

    Returns the checkpoints and the final θ (for the caller to compare with the cached θˢ: the
    recipe is seeded, so the two agree unless the hardware or the code changed). Batch-norm
    models train in train mode as in `train`; their buffers are not kept."""
    batch = recipe.batch_size or len(data)
    if recipe.optimizer == "lbfgs":
        theta = lbfgs(model, loss, data, theta0, recipe)
        return [Checkpoint(recipe.epochs - 1, theta.clone(), 1.0 / len(data))], theta
    keep, kept = checkpoint_epochs(recipe.epochs, count), {}

    def on_epoch_end(epoch: int, theta: Tensor) -> None:
        if epoch in keep:
            kept[epoch] = theta.detach().clone()

    if _module_loop(model.module):
        saved = {k: b.clone() for k, b in model.buffers.items()}
        try:
            theta, _ = train_mode_minibatch(model, loss, data, theta0, recipe, on_epoch_end=on_epoch_end)
        finally:
            model.set_buffers(saved)
    else:
        theta = sgd(model, loss, data, theta0, recipe, on_epoch_end=on_epoch_end)
    out, previous = [], -1
    for epoch in keep:
        out.append(Checkpoint(epoch, kept[epoch], learning_rate(recipe, epoch) * (epoch - previous) / batch))
        previous = epoch
    return out, theta
