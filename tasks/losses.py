"""The tasks' per-example losses L(y, t), each with its output-space Hessian–vector product in
closed form.

A loss is called as `loss(outputs, targets)`: outputs y (n, C), targets (n, ...) -> (n,), convex
in y. `loss.output_hvp(outputs, targets, v)` is H_y v, the Hessian of Σᵢ L(yᵢ, tᵢ) in y applied
to v (n, C) -> (n, C). Every Gauss–Newton product goes through it (benchmark.problem), and by
autodiff (a jvp of the output gradient) it cost as much as the model's own jvp and vjp on small
nets; here it is a few elementwise operations. A task may still give a plain function as its
loss: the problem then falls back to autodiff. tests/test_losses.py pins each closed form to
autodiff.

    squared error       L = ½‖y − t‖²                              H v = v
    cross-entropy       L = −log softmax(y)_t                      H v = p ⊙ v − p (pᵀv), p = softmax(y)
    binary CE (summed)  L = Σ_c BCE(σ(y_c), t_c)                   H v = σ(y) ⊙ (1 − σ(y)) ⊙ v
    token CE (mean)     y = T blocks of V logits, L = (1/T) Σ_τ CE  H v = blockwise cross-entropy / T
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def _softmax_hvp(logits: Tensor, v: Tensor) -> Tensor:
    """(diag(p) − p pᵀ) v along the last dimension, p = softmax(logits)."""
    p = logits.softmax(dim=-1)
    pv = p * v
    return pv - p * pv.sum(dim=-1, keepdim=True)


class SquaredError:
    """½‖y − t‖² per example; targets (n, C)."""

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return 0.5 * (outputs - targets).pow(2).sum(dim=1)

    def output_hvp(self, outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        return v


class CrossEntropy:
    """Softmax cross-entropy of logits (n, C) against class indices (n,)."""

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets, reduction="none")

    def output_hvp(self, outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        return _softmax_hvp(outputs, v)


class BinaryCrossEntropy:
    """Sigmoid binary cross-entropy of logits (n, C) against targets in [0, 1] with n·C entries
    (any shape: a logistic regression's (n,) labels for its (n, 1) logit), summed over the C outputs."""

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(outputs, targets.reshape(outputs.shape), reduction="none").sum(dim=1)

    def output_hvp(self, outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        s = outputs.sigmoid()
        return s * (1 - s) * v


class TokenCrossEntropy:
    """A sequence model's loss: outputs (n, T·V) are T blocks of V logits, targets (n, T) token
    indices; L is the mean over the T positions of their cross-entropies."""

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        n, T = targets.shape
        logits = outputs.reshape(n * T, -1)
        return F.cross_entropy(logits, targets.reshape(-1), reduction="none").reshape(n, T).mean(dim=1)

    def output_hvp(self, outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        n, T = targets.shape
        blocks = lambda z: z.reshape(n, T, -1)
        return (_softmax_hvp(blocks(outputs), blocks(v)) / T).reshape(outputs.shape)


squared_error = SquaredError()
cross_entropy = CrossEntropy()
binary_cross_entropy = BinaryCrossEntropy()
token_cross_entropy = TokenCrossEntropy()

__all__ = ["SquaredError", "CrossEntropy", "BinaryCrossEntropy", "TokenCrossEntropy", "squared_error", "cross_entropy",
           "binary_cross_entropy", "token_cross_entropy"]
