"""`tracin`: TracIn-CP (Pruthi et al. 2020) over checkpoints of the base training.

    S[q, m] = Σ_k w_k ∇ℓ_q(θ_k)ᵀ ∇ℓₘ(θ_k),   w_k = η_k · E_k / |B|

θ_k: θ at K epoch ends of the base training (Problem.checkpoints(); the harness keeps
K = benchmark.ground_truth.CHECKPOINTS = 5, evenly spaced, the last one θˢ), η_k the learning rate
of that epoch, E_k the epochs since the previous checkpoint, |B| the batch size. Each epoch takes
one step of size η/|B| along ∇ℓₘ, whose first-order effect on ℓ_q is (η/|B|) ∇ℓ_qᵀ∇ℓₘ; TracIn-CP
sums it over the training, one checkpoint standing for the epochs before it. Removing m undoes
those steps, so the score is the predicted rise of ℓ_q, the sign of the benchmark's convention.
No curvature and no damping: a baseline of the training-dynamics family (uses_curvature False).
With L-BFGS training (the LR tasks) there is one checkpoint, θˢ with weight ε, and TracIn is
grad-dot. Batch-norm models: gradients at θ_k use the running statistics frozen at θˢ.
Hyperparameters: `checkpoints` (use the last this many of the kept ones; None: all), `weighted`
(False: w_k = 1/K, the plain average of gradient dot products, as in Pruthi et al.'s CP variant
with a constant learning rate).
"""
from __future__ import annotations

import torch
from torch import Tensor

from benchmark.problem import Batch, Problem

from .base import Estimator


class TracIn(Estimator):
    description = "TracIn-CP: learning-rate-weighted gradient dot products over training checkpoints"
    uses_curvature = False
    uses_checkpoints = True

    def __init__(self, checkpoints: int | None = None, weighted: bool = True):
        self.checkpoints = checkpoints
        self.weighted = weighted

    def fit(self, problem: Problem) -> "TracIn":
        kept = problem.checkpoints()
        if self.checkpoints is not None:
            if self.checkpoints < 1:
                raise ValueError(f"checkpoints must be at least 1 (or None for all), got {self.checkpoints}")
            kept = kept[-self.checkpoints:]
        self.thetas_ = [c.theta for c in kept]
        self.weights_ = [c.weight if self.weighted else 1.0 / len(kept) for c in kept]
        self.epochs_ = [c.epoch for c in kept]
        self.problem_ = problem
        return self

    def scores(self, train_idx: Tensor, query: Batch) -> Tensor:
        p = self.problem
        train = p.train.subset(train_idx)
        S = torch.zeros(len(query), len(train_idx), dtype=p.dtype, device=p.device)
        for theta, weight in zip(self.thetas_, self.weights_):
            S += weight * (p.gradients(query, params=theta) @ p.gradients(train, params=theta).T)
        return S
