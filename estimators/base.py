"""The estimator contract (scikit-learn style).

`__init__` only stores hyperparameters; `fit(problem)` does the work that does not depend on
which examples are removed and returns self; `scores(train_idx, query)` returns the predicted
test-loss differences S[q, m] ≈ ℓ_q(θ₋ₘ) − ℓ_q(θˢ), shape (n_query, n_removed).
Estimators of the influence-function family also return the parameter change Δθ₋ₘ ≈ θ₋ₘ − θˢ
via `parameter_change(train_idx)`, shape (n_removed, d), and then score by ∇ℓ_q(θˢ)ᵀ Δθ₋ₘ.

Sign convention (DESIGN.md §1, pinned by tests/test_ridge.py): removing m moves θ by
+ε (G + (wd+λ)I)⁻¹ ∇ℓₘ(θˢ), which raises ℓₘ; ε = 1/N.
"""
from __future__ import annotations

import inspect
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from benchmark.problem import Batch, Problem


class NotFittedError(RuntimeError):
    pass


class Estimator(ABC):
    """Base class. Subclasses set hyperparameters in `__init__` (keyword arguments with
    defaults, stored under the same names) and implement `fit` and `scores`."""

    #: a short description shown in the leaderboard
    description: str = ""

    #: False for baselines that ignore curvature (e.g. grad-dot): the conformance checks then
    #: require only a positive correlation with the closed-form influence, not its values
    uses_curvature: bool = True

    #: how far, as a fraction of max |S|, a removed example's (or a query's) score may move when
    #: other rows are scored in the same call. 0 for a direct method: only the rounding of the
    #: batched products differs (the checks allow estimators.checks.SUBSET_RTOL for that). An
    #: iterative solve stopped at a tolerance is defined only to about that tolerance, because its
    #: unconverged iterates amplify those rounding differences (measured in estimators/cg.py).
    #: The conformance checks that compare two calls allow max(SUBSET_RTOL, batch_rtol).
    batch_rtol: float = 0.0

    #: True for estimators that read Problem.checkpoints(): the harness computes (or loads) the
    #: training checkpoints before it starts the clock, as it does the ground truth
    uses_checkpoints: bool = False

    def get_params(self) -> dict:
        """The hyperparameters, read from `__init__`'s signature (recorded in every result)."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {n: getattr(self, n) for n in names if hasattr(self, n)}

    @abstractmethod
    def fit(self, problem: Problem) -> "Estimator":
        """Prepare everything that does not depend on the removed examples; return self."""

    @abstractmethod
    def scores(self, train_idx: Tensor, query: Batch) -> Tensor:
        """Predicted test-loss differences, (len(query), len(train_idx))."""

    @property
    def problem(self) -> Problem:
        if getattr(self, "problem_", None) is None:
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit(problem) before scores()")
        return self.problem_

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


class ParameterEstimator(Estimator):
    """An influence-function estimator: predicts Δθ₋ₘ and scores with query gradients."""

    @abstractmethod
    def parameter_change(self, train_idx: Tensor) -> Tensor:
        """Predicted θ₋ₘ − θˢ for each removed example, (len(train_idx), d)."""

    def scores(self, train_idx: Tensor, query: Batch) -> Tensor:
        """S[q, m] = ∇ℓ_q(θˢ)ᵀ Δθ₋ₘ, (len(query), len(train_idx))."""
        return self.scores_from_change(self.parameter_change(train_idx), query)

    def scores_from_change(self, delta: Tensor, query: Batch) -> Tensor:
        """∇ℓ_q(θˢ)ᵀ Δθ for a parameter change delta (n_removed, d) -> (len(query), n_removed)."""
        return self.problem.gradients(query) @ delta.T


def effective_damping(problem: Problem, damping: float | None) -> float:
    """wd + λ, with λ the estimator's own damping or, by default, the problem's."""
    return problem.weight_decay + (problem.damping if damping is None else damping)


def dense_gauss_newton_flops(problem: Problem) -> float:
    """N·C·d²: the flops of forming the dense G over the training set (C outputs per example)."""
    n_outputs = problem.outputs(problem.train.inputs[:1]).numel()
    return problem.n_train * n_outputs * problem.n_params ** 2


def dtype_option(value: str | None, owner: str, option: str, default: torch.dtype) -> torch.dtype:
    """The torch dtype an estimator's dtype option names ("float32", "float64"), or `default`
    (the problem's) where it is None; anything that is not a floating torch dtype is refused
    with a message naming the option."""
    if value is None:
        return default
    dtype = getattr(torch, str(value), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{owner}: {option}={value!r} is not a floating torch dtype; "
                         "give 'float32', 'float64' or None (the problem's own)")
    return dtype
