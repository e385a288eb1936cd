"""The Task abstraction: what is analysed (data, model, loss, base training recipe).

Everything else (training, ground truth, estimators, metrics) belongs to the harness in
`benchmark/`. A task is a small class; `tasks.registry` maps names to instances.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

SCALES = ("smoke", "cpu", "paper")
Scale = Literal["smoke", "cpu", "paper"]


def check_scale(scale: str) -> str:
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    return scale


@dataclass(frozen=True)
class Splits:
    """Deterministic tensors of one task at one scale.

    x_train: (N, ...) inputs, y_train: (N, ...) targets; x_query / y_query: held-out examples
    whose loss changes are predicted (never training examples).
    """

    x_train: Tensor
    y_train: Tensor
    x_query: Tensor
    y_query: Tensor

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])


@dataclass(frozen=True)
class Recipe:
    """How the base model θˢ is trained from θ⁰.

    optimizer: "lbfgs" (full batch, to convergence), "sgd" (minibatch, optional momentum) or
    "adam" (minibatch Adam, betas (0.9, 0.999), eps 1e-8; `momentum` unused).
    weight_decay enters the objective as (wd/2)‖θ‖².
    """

    optimizer: Literal["lbfgs", "sgd", "adam"]
    epochs: int
    batch_size: int | None = None
    lr: float = 1.0
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class GroundTruthConfig:
    """How the ground truth is computed at one scale.

    n_removed: R training examples removed one at a time; n_query: Q query examples;
    n_eval: size of the fixed subset of training inputs on which outputs are stored;
    pbrf_tol: the PBRF is converged when ‖∇J(θ)‖ ≤ pbrf_tol · ε‖∇ℓₘ(θˢ)‖;
    dense_max_params: a dense d×d solve is used when d ≤ this, float64 CG otherwise;
    removed_chunk: solve the PBRF / linearized PBRF for this many removed examples at a time
    (None: all R at once); example_chunk: training examples per vmapped chunk of the problem's
    operators (None: the Problem default, 1024). Both bound memory only; they enter the cache
    key only when set, so existing keys are unchanged. n_second_solve: the PBRF of this many
    removed examples is solved a second, independent way, the ground truth's error bar
    (benchmark.second_solve; None: the harness default per scale, 4 at smoke and 8 otherwise;
    0: none); also in the key only when set. preconditioner_dtype: the dense factor inside the
    PBRF solve's preconditioner in this dtype ("float32"; None: the problem's), see
    benchmark.responses.SolverSettings; in the PBRF's key only, and only when set.
    gauss_newton_dtype: the Gauss–Newton products of the PBRF solve's inner CG in this dtype
    ("float32"; None: the problem's), likewise (SolverSettings). nystrom_rank: where d >
    dense_max_params, CG (linearized response, PBRF inner solves) is preconditioned by a rank-ℓ
    Nyström approximation of G (SolverSettings); in the keys only when set.
    second_solve_preconditioned: the second solve's L-BFGS starts each iteration's inverse-Hessian
    model from (G + μI)⁻¹ at θˢ (the ground truth's own solver: dense, or its Nyström
    preconditioner) instead of a multiple of I (benchmark.second_solve); in the second solve's
    key only, and only when set.
    """

    n_removed: int
    n_query: int
    n_eval: int
    pbrf_tol: float = 1e-8
    pbrf_max_steps: int = 50
    linear_rtol: float = 1e-10
    dense_max_params: int = 16384
    removed_chunk: int | None = None
    example_chunk: int | None = None
    n_second_solve: int | None = None
    preconditioner_dtype: str | None = None
    gauss_newton_dtype: str | None = None
    nystrom_rank: int | None = None
    second_solve_preconditioned: bool | None = None


@dataclass(frozen=True)
class ScaleConfig:
    recipe: Recipe
    ground_truth: GroundTruthConfig
    params: dict = field(default_factory=dict)  # task-specific sizes (widths, subset sizes)


class Task(ABC):
    """One benchmark task. Subclasses set `name`, `version` and implement the four methods.

    Bump `version` whenever data, model or recipe change: every cache entry depends on it.
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1
    #: the damping λ of every response function and estimator (the PBRF's proximity term is
    #: (wd + λ)/2 ‖Δ‖²), unless `damping_at` says otherwise for a scale
    damping: ClassVar[float] = 1e-3
    dtype: ClassVar[torch.dtype] = torch.float64
    description: ClassVar[str] = ""
    #: the training objective is strongly convex in θ (a linear model, a convex loss, weight
    #: decay) and the recipe trains to its optimum: every retraining response then has one
    #: optimum, so cold- and warm-start retraining agree (checked by the decomposition test)
    convex: ClassVar[bool] = False
    #: the model has batch norm: every response runs it in eval mode (statistics frozen at θˢ),
    #: and warm / proximal SGD retraining from θˢ then runs at a stable learning rate
    #: (benchmark.training.stable_sgd_recipe); a test checks it against the model
    batch_norm: ClassVar[bool] = False
    #: the scales at which the task runs when no --task is given; at the others it runs only
    #: when named (its ground truth does not fit that scale's time: see `python -m benchmark.cost`)
    default_scales: ClassVar[tuple[str, ...]] = ("smoke", "cpu", "paper")

    @abstractmethod
    def config(self, scale: Scale) -> ScaleConfig:
        """Sizes, recipe and ground-truth settings at `scale`."""

    @abstractmethod
    def data(self, scale: Scale, data_root: Path) -> Splits:
        """Deterministic train / query tensors (float inputs in `self.dtype`)."""

    @abstractmethod
    def model(self, scale: Scale) -> nn.Module:
        """A freshly constructed model (its initialisation is seeded by the harness)."""

    @abstractmethod
    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-example loss L(f(θ,x), t), shape (n,), convex in `outputs`. A task may set a loss
        of tasks.losses instead (`loss = cross_entropy`): its output-space Hessian–vector product
        is then in closed form, which makes every Gauss–Newton product cheaper."""

    def recipe(self, scale: Scale) -> Recipe:
        return self.config(scale).recipe

    def ground_truth(self, scale: Scale) -> str:
        """The response function the task's rows are scored against by default at `scale`
        (benchmark.ground_truth.ALL_RESPONSES): the PBRF's minimiser, unless a task says why not."""
        return "pbrf"

    def ground_truth_config(self, scale: Scale) -> GroundTruthConfig:
        return self.config(scale).ground_truth

    def damping_at(self, scale: Scale) -> float:
        """The damping λ at `scale` (the problem's `damping`): the class's, unless a task says why not."""
        return self.damping

    def fingerprint(self, scale: Scale) -> dict:
        """Everything the trained model and the ground truth depend on (hashed for the cache)."""
        cfg = self.config(scale)
        return {
            "task": self.name,
            "version": self.version,
            "scale": scale,
            "damping": self.damping_at(scale),
            "dtype": str(self.dtype),
            "recipe": dataclasses.asdict(cfg.recipe),
            "params": cfg.params,
        }


def split_indices(n: int, fractions: tuple[float, ...], seed: int) -> list[Tensor]:
    """A seeded permutation of range(n) cut into consecutive parts of the given fractions."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    bounds = [0]
    for f in fractions:
        bounds.append(bounds[-1] + int(round(f * n)))
    bounds[-1] = min(bounds[-1], n)
    return [perm[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def standardize(train: Tensor, *others: Tensor) -> list[Tensor]:
    """(x − mean) / std with the statistics of `train` (columns with std 0 are left centred)."""
    mean, std = train.mean(0), train.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return [(x - mean) / std for x in (train, *others)]
