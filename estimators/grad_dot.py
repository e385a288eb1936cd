"""`grad-dot`: no curvature, S[q, m] = ε ∇ℓ_q(θˢ)ᵀ ∇ℓₘ(θˢ). A baseline that every curvature-aware
estimator should beat; it predicts no parameter change of the right size, so it has none.

`grad-cos`: the same with unit gradients, S[q, m] = ε cos(∇ℓ_q, ∇ℓₘ) = ε ĝ_qᵀ ĝₘ, ĝ = g/‖g‖
(a zero gradient stays zero): the gradient-similarity baseline of e.g. Pruthi et al. 2020 and
Barshan et al. 2020, which discounts examples whose gradients are merely large. No
hyperparameters, no curvature."""
from __future__ import annotations

import torch
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

    @staticmethod
    def features(gradients: Tensor) -> Tensor:
        """What is compared, per example: the gradients themselves, (n, d) -> (n, d)."""
        return gradients

    def scores(self, train_idx: Tensor, query: Batch) -> Tensor:
        p = self.problem
        return p.epsilon * self.features(p.gradients(query)) @ self.features(p.train_gradients(train_idx)).T


class GradCos(GradDot):
    description = "cosine similarity of gradients (identity curvature, unit gradients), a baseline"

    @staticmethod
    def features(gradients: Tensor) -> Tensor:
        """Unit gradients g/‖g‖ (a zero gradient stays zero), (n, d) -> (n, d)."""
        norms = torch.linalg.vector_norm(gradients, dim=1, keepdim=True)
        return gradients / norms.clamp_min(torch.finfo(gradients.dtype).tiny)
