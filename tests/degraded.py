"""Planted estimators for tests/test_guard.py and tests/test_specs.py, loaded through file specs
(`--estimator tests/degraded.py:FlippedExact`). Not a test module."""
from __future__ import annotations

import time

import torch

from estimators import Exact, GradDot, LiSSA


class FlippedExact(Exact):
    """`exact` with the sign of its scores flipped: Pearson ≈ −1 where `exact` has ≈ +1."""

    def scores(self, train_idx, query):
        return -super().scores(train_idx, query)


class ShallowLiSSA(LiSSA):
    """LiSSA truncated at depth 1: hardly more than a rescaled gradient dot product."""

    def __init__(self, damping=None, depth: int = 1, scale=None, batch_size: int = 128, repeats: int = 1,
                 seed: int = 0):
        super().__init__(damping=damping, depth=depth, scale=scale, batch_size=batch_size, repeats=repeats,
                         seed=seed)


class EndlessOperators(Exact):
    """Never finishes scoring, but calls the problem's operators all the time (interruptible)."""

    def scores(self, train_idx, query):
        p = self.problem
        v = torch.ones(1, p.n_params, dtype=p.dtype, device=p.device)
        while True:
            v = p.gnvp(v)
            v = v / v.norm()


class Sleepy(GradDot):
    """Correct scores, but sleeps for `seconds` after computing them (no operator call after that)."""

    def __init__(self, seconds: float = 1.0):
        self.seconds = seconds

    def scores(self, train_idx, query):
        S = super().scores(train_idx, query)
        time.sleep(self.seconds)
        return S


class ScaledGradDot(GradDot):
    """grad-dot times `alpha` (a constructor argument, for --estimator-param tests)."""

    def __init__(self, alpha: float = 1.0):
        self.alpha = alpha

    def scores(self, train_idx, query):
        return self.alpha * super().scores(train_idx, query)
