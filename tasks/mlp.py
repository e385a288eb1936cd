"""Two-hidden-layer ReLU MLPs: UCI regression (concrete, energy) and 10 % image classification
(MNIST, FashionMNIST), trained with minibatch SGD, batch 128 (paper: 1000 epochs).

Regression: inputs and target standardised with training statistics, 70 % train / 20 % query /
10 % validation (not used by the benchmark), loss ½(y − t)². Classification: pixels / 255,
flattened, cross-entropy; queries come from images never used for training.
The sizes of each scale are in the `_SCALES` tables below, with the reasons.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import data as datasets
from .base import GroundTruthConfig, Recipe, ScaleConfig, Splits, Task, split_indices, standardize
from .losses import cross_entropy, squared_error


def mlp(n_in: int, hidden: int, n_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, n_out))


class MLPTask(Task):
    n_out: int
    n_in: int
    # scale -> (config params, recipe, ground truth)
    _SCALES: dict

    def config(self, scale):
        params, recipe, gt = self._SCALES[scale]
        return ScaleConfig(recipe=recipe, ground_truth=gt, params=params)

    def model(self, scale):
        return mlp(self.n_in, self.config(scale).params["hidden"], self.n_out)


# Regression: the whole dataset is small (≤ 1030 rows), so only width and epochs change.
# Training is cheap here (6 minibatches an epoch), so cpu keeps the paper's 1000 epochs.
_REGRESSION_SCALES = {
    "smoke": ({"hidden": 16}, Recipe("sgd", epochs=100, batch_size=128, lr=0.05, weight_decay=1e-2, seed=0),
              GroundTruthConfig(n_removed=8, n_query=8, n_eval=64)),
    "cpu": ({"hidden": 32}, Recipe("sgd", epochs=1000, batch_size=128, lr=0.05, weight_decay=1e-2, seed=0),
            GroundTruthConfig(n_removed=40, n_query=40, n_eval=256)),
    "paper": ({"hidden": 64}, Recipe("sgd", epochs=1000, batch_size=128, lr=0.05, weight_decay=1e-2, seed=0),
              GroundTruthConfig(n_removed=20, n_query=40, n_eval=512)),
}


class RegressionMLP(MLPTask):
    n_in, n_out = 8, 1
    _SCALES = _REGRESSION_SCALES

    def _arrays(self, data_root):
        raise NotImplementedError

    def data(self, scale, data_root):
        X, y = self._arrays(data_root)
        X = torch.as_tensor(X, dtype=self.dtype)
        y = torch.as_tensor(y, dtype=self.dtype).reshape(-1, 1)
        train, query, _validation = split_indices(len(X), (0.7, 0.2, 0.1), seed=0)
        x_train, x_query = standardize(X[train], X[query])
        y_train, y_query = standardize(y[train], y[query])
        return Splits(x_train, y_train, x_query, y_query)

    loss = squared_error


class ConcreteMLP(RegressionMLP):
    name = "mlp-concrete"
    description = "MLP regression, UCI concrete compressive strength (1030×8)"

    def _arrays(self, data_root):
        return datasets.load_concrete(data_root)


class EnergyMLP(RegressionMLP):
    name = "mlp-energy"
    description = "MLP regression, UCI energy efficiency, heating load (768×8)"

    def _arrays(self, data_root):
        return datasets.load_energy(data_root)


# Images: paper scale is the paper's 10 % (6,000 images). cpu scale keeps the 784 inputs but
# uses 1,000 images and width 16 (d = 13,002): the dense Gauss–Newton matrix then takes about
# 40 s to form on 2 cores, so the ground truth stays exact (dense solves) and the whole cpu
# suite fits in about an hour. 1000 epochs of 8 minibatches train in about 15 s.
# The PBRF's preconditioner factor is float32 at cpu: at d = 13,002 its two triangular solves
# read 1.35 GB in float64 and are memory-bound (2 threads, 8 right-hand sides: 0.152 s in
# float64, 0.064 s in float32), against 0.040 s for the 8 rows' Gauss–Newton product over N.
_IMAGE_SCALES = {
    "smoke": ({"n_train": 300, "hidden": 8}, Recipe("sgd", epochs=30, batch_size=128, lr=0.1, weight_decay=1e-2, seed=0),
              GroundTruthConfig(n_removed=8, n_query=8, n_eval=64)),
    "cpu": ({"n_train": 1000, "hidden": 16}, Recipe("sgd", epochs=1000, batch_size=128, lr=0.1, weight_decay=5e-3, seed=0),
            GroundTruthConfig(n_removed=40, n_query=40, n_eval=256, preconditioner_dtype="float32")),
    "paper": ({"n_train": 6000, "hidden": 128}, Recipe("sgd", epochs=1000, batch_size=128, lr=0.1, weight_decay=1e-3, seed=0),
              GroundTruthConfig(n_removed=20, n_query=40, n_eval=1000)),
}


class ImageMLP(MLPTask):
    n_in, n_out = 784, 10
    _SCALES = _IMAGE_SCALES

    def _images(self, data_root) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(train pool x, y, query pool x, y) as uint8 / int64 tensors."""
        raise NotImplementedError

    def data(self, scale, data_root):
        x_pool, y_pool, x_q, y_q = self._images(data_root)
        n = self.config(scale).params["n_train"]
        g = torch.Generator().manual_seed(0)
        train = torch.randperm(len(x_pool), generator=g)[:n]
        query = torch.randperm(len(x_q), generator=g)[:1000]
        as_input = lambda x: x.reshape(len(x), -1).to(self.dtype) / 255.0
        return Splits(as_input(x_pool[train]), y_pool[train], as_input(x_q[query]), y_q[query])

    loss = cross_entropy


class MnistMLP(ImageMLP):
    name = "mlp-mnist"
    description = "MLP 784-H-H-10, MNIST subset"

    def _images(self, data_root):
        x, y = (torch.as_tensor(a) for a in datasets.load_mnist(data_root))
        # the offline copy has 10,000 training images: the first 6,000 of a seeded permutation
        # form the training pool, the other 4,000 the query pool (never trained on)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
        pool, held_out = perm[:6000], perm[6000:]
        return x[pool], y[pool], x[held_out], y[held_out]


class FashionMLP(ImageMLP):
    name = "mlp-fashion"
    description = "MLP 784-H-H-10, FashionMNIST subset"

    def _images(self, data_root):
        x, y = (torch.as_tensor(a) for a in datasets.load_fashion_mnist(data_root, train=True))
        xq, yq = (torch.as_tensor(a) for a in datasets.load_fashion_mnist(data_root, train=False))
        return x, y, xq, yq
