"""Logistic regression on UCI breast cancer and Pima diabetes (the paper's convex tasks).

Inputs standardised with training statistics, 80 % train / 20 % query, binary cross-entropy
on the logit, L2 weight decay 0.01, full-batch L-BFGS to convergence in float64. The model is
tiny, so every scale uses all the data; the scales differ only in how many removed examples
and queries the ground truth covers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import data as datasets
from .base import GroundTruthConfig, Recipe, ScaleConfig, Splits, Task, split_indices, standardize
from .losses import binary_cross_entropy

_RECIPE = Recipe(optimizer="lbfgs", epochs=2000, weight_decay=0.01, seed=0)
_GROUND_TRUTH = {
    "smoke": GroundTruthConfig(n_removed=10, n_query=8, n_eval=64),
    "cpu": GroundTruthConfig(n_removed=40, n_query=40, n_eval=256),
    "paper": GroundTruthConfig(n_removed=20, n_query=40, n_eval=256),
}


class LogisticTask(Task):
    version = 1
    convex = True

    def config(self, scale):
        return ScaleConfig(recipe=_RECIPE, ground_truth=_GROUND_TRUTH[scale])

    def _arrays(self, data_root: Path) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def data(self, scale, data_root):
        X, y = self._arrays(data_root)
        X = torch.as_tensor(X, dtype=self.dtype)
        y = torch.as_tensor(y, dtype=self.dtype)
        train, query = split_indices(len(X), (0.8, 0.2), seed=0)
        x_train, x_query = standardize(X[train], X[query])
        return Splits(x_train, y[train], x_query, y[query])

    def model(self, scale):
        return nn.Linear(self._n_features, 1)

    loss = binary_cross_entropy  # the (n, 1) logit against the (n,) labels


class CancerLR(LogisticTask):
    name = "lr-cancer"
    description = "logistic regression, UCI breast cancer (569×30)"
    _n_features = 30

    def _arrays(self, data_root):
        return datasets.load_breast_cancer()


class DiabetesLR(LogisticTask):
    name = "lr-diabetes"
    description = "logistic regression, Pima diabetes (768×8)"
    _n_features = 8

    def _arrays(self, data_root):
        return datasets.load_pima(data_root)
