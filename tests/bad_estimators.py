"""Misbehaving estimators for tests/test_bad_input.py, loaded through the file-spec loader
(`make_estimator("tests/bad_estimators.py:RaisesInFit")`). Not a test module."""
from __future__ import annotations

import torch

from estimators.base import Estimator, ParameterEstimator
from estimators.grad_dot import GradDot


class RaisesInFit(Estimator):
    def fit(self, problem):
        raise ValueError("boom: this estimator always fails in fit")

    def scores(self, train_idx, query):  # pragma: no cover - never reached
        return torch.zeros(len(query), len(train_idx), dtype=torch.float64)


class NaNScores(Estimator):
    def fit(self, problem):
        self.problem_ = problem
        return self

    def scores(self, train_idx, query):
        out = torch.zeros(len(query), len(train_idx), dtype=torch.float64)
        out[0, 0] = float("nan")
        return out


class WrongShape(Estimator):
    def fit(self, problem):
        self.problem_ = problem
        return self

    def scores(self, train_idx, query):
        return torch.zeros(len(query), len(train_idx) + 1, dtype=torch.float64)


class ModifiesParams(Estimator):
    """Changes θˢ in place (a classic mistake: forgetting to clone before an update)."""

    def fit(self, problem):
        self.problem_ = problem
        problem.params.add_(0.5)
        return self

    def scores(self, train_idx, query):
        return torch.zeros(len(query), len(train_idx), dtype=torch.float64)


class FitReturnsNone(Estimator):
    def fit(self, problem):
        self.problem_ = problem  # forgot `return self`

    def scores(self, train_idx, query):
        return torch.zeros(len(query), len(train_idx), dtype=torch.float64)


class NotAnEstimator:
    """No fit / scores at all."""

    def predict(self, x):
        return x


class GoodGradDot(GradDot):
    """A well-behaved estimator from a file spec (the loader itself works)."""


class ModifiesThenRaises(Estimator):
    """Changes θˢ in place, then fails: the harness must still leave the problem as it was."""

    def fit(self, problem):
        problem.params.mul_(2.0)
        raise RuntimeError("failed after scribbling on the problem")

    def scores(self, train_idx, query):  # pragma: no cover - never reached
        return torch.zeros(len(query), len(train_idx), dtype=torch.float64)


class IntegerScores(GradDot):
    """Rounds its scores to int64: a loss change is not an integer."""

    def scores(self, train_idx, query):
        return (1e6 * super().scores(train_idx, query)).round().to(torch.int64)


class ConstantScores(Estimator):
    """The same score for every removed example: it ranks nothing."""

    def fit(self, problem):
        self.problem_ = problem
        return self

    def scores(self, train_idx, query):
        return torch.ones(len(query), len(train_idx), dtype=torch.float64)


class ChangesGlobalState(GradDot):
    """Sets torch's process-wide state in fit and leaves it so (every later row would inherit it)."""

    def fit(self, problem):
        torch.set_default_dtype(torch.float64 if torch.get_default_dtype() == torch.float32 else torch.float32)
        torch.set_num_threads(1 if torch.get_num_threads() != 1 else 2)
        torch.manual_seed(1234)
        torch.set_grad_enabled(False)
        torch.use_deterministic_algorithms(True)
        return super().fit(problem)


class OverflowingChange(ParameterEstimator):
    """A finite parameter change so large that the model's outputs at θˢ + Δ overflow, with
    finite scores of its own (grad-dot's)."""

    def fit(self, problem):
        self.problem_ = problem
        return self

    def parameter_change(self, train_idx):
        return torch.full((len(train_idx), self.problem.n_params), 1e308, dtype=self.problem.dtype)

    def scores(self, train_idx, query):
        return self.problem.gradients(query) @ self.problem.train_gradients(train_idx).T
