"""`grad-dot`: no curvature, S[q, m] = ε ∇ℓ_q(θˢ)ᵀ ∇ℓₘ(θˢ). A baseline that every curvature-aware
estimator should beat; it predicts no parameter change of the right size, so it has none."""
from __future__ import annotations

from torch import Tensor

from benchmark.problem import Batch, Problem

from .base import Estimator


class GradDot(Estimator):
    description = "gradient dot product (identity curvature), a baseline"
    uses_curvature = False

    def __init__(self):
        pass

    def fit(self, problem: Problem) -> "GradDot":
        self.problem_ = problem
        return self

    def scores(self, train_idx: Tensor, query: Batch) -> Tensor:
        p = self.problem
        return p.epsilon * p.gradients(query) @ p.train_gradients(train_idx).T
