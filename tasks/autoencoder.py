"""The deep autoencoder on MNIST (paper §6; Hinton & Salakhutdinov 2006, Martens & Grosse 2015).

Model: encoder 784-1000-500-250-30 and decoder 30-250-500-1000-784, fully connected, logistic
sigmoid hidden units except the 30-unit code layer, which is linear (as in Hinton &
Salakhutdinov and the K-FAC experiments). The network outputs 784 logits; the loss is the
Bernoulli cross-entropy of the pixels (in [0, 1]) against sigmoid(logits), summed over the 784
pixels per example: convex in the logits, its Gauss–Newton output Hessian diag(p(1−p)).

Data: the staged MNIST (the first 10,000 training images); a seeded 1,000 of them form the
query pool (queries must never be trained on), the training set comes from the other 9,000
(the paper trains on all 60,000: with torchvision's full MNIST staged, raise `n_train`).
Pixels / 255, flattened; the target is the input.

Recipe (paper): SGD with momentum 0.9, batch 1024, weight decay 1e-5, damping 1e-3, 1000
epochs; learning rate 0.01 is ours (not stated in the paper).

Scales (tables below):
  smoke  64 images, as at cpu (pooled, widths 32-16-8, d = 14,124, Adam lr 0.03), 50 epochs of
         batch 32, wd 2e-2 (ε/(wd+λ) = 0.74, as for the smoke CNNs), R = Q = 4, at most 10 PBRF
         steps. Measured on the 64 images (mean-image reconstruction 47.7 per image): 46.6,
         outputs varying across inputs (relative spread 0.14). The old smoke recipe (784
         pixels, widths 16-8-4-2, SGD lr 0.01, 20 epochs, wd 5e-2) gave every input the same
         output (spread 3e-8: ground_truth.check_base_model now rejects that); so did Adam at
         lr 0.01-0.03 on it, and pooled 32-16-8 at wd 5e-2 (spread 5e-5). Ground truth by
         Nyström-preconditioned CG as at cpu (below): PBRF 73.4 → 2.0 s, the task's 4 rows and
         decomposition 82.9 → 11.6 s from a cold cache (one thread, side by side), Pearson
         equal to 1.2e-8, scores within 1.2e-6 (the two rows stopped at 10 steps).
  cpu    1,000 images 2×2 average-pooled (196 pixels), widths 32-16-8 (d = 14,124), Adam
         (lr 0.03) for 200 epochs of batch 128, wd 5e-3 (ε/(wd+λ) = 0.17, as for the cpu
         CNNs), R = Q = 40. Why, measured (one thread, the
         1,000 pooled images, full-batch objective after 200 epochs; the mean-image
         reconstruction, the plateau, scores 52.2 per image): the old recipe (SGD, momentum 0.9,
         lr 0.01, 784 pixels, widths 64-32-16-8, d = 107k) stayed on the plateau (train loss 206
         per 784-pixel image) and its CG ground truth took 858 s for R = 10. On the pooled
         images, widths 32-16-8-4: SGD lr 0.01 wd 1e-2 53.2, Adam lr 1e-3 / 3e-3 53.3 / 53.2 (wd
         1e-2), 52.4 (wd 1e-3), 52.2 (wd 1e-4): all on the plateau; Adam lr 0.01 wd 1e-4 43.4.
         Widths 32-16-8, Adam lr 0.01: 40.8 (wd 1e-3), 42.2 (wd 3e-3); lr 0.03: 35.8 (wd 1e-3),
         39.1 (wd 3e-3), 40.8 (wd 5e-3, chosen: the mildest PBRF nonlinearity off the plateau).
         Ground truth by CG preconditioned with a rank-400 Nyström approximation of G + μI
         from float32 products (dense_max_params=0, nystrom_rank=400), not by the dense G:
         forming G costs N·C·d² = 3.9e13 flops at C = 196 outputs, 1,449 s of the 1,510 s
         ground truth committed before stop 25 (AMD EPYC) and 705 s here (Intel Xeon, one
         thread beside another job). Measured here (`linearized_pbrf` and `pbrf` of
         benchmark.responses on one cached base model, this config against dense_max_params
         16,384 without nystrom_rank): Nyström 3 s to build, linearized PBRF 18 s
         (62 CG iterations), PBRF of the 40 rows 59 s; for the first 8 rows the dense path's
         PBRF took 30.6 s after G, Nyström 27 s, and they agree to 2.3e-8 on the converged
         rows (2.3e-5 on the one stopped at 20 steps), 2e-10 on the linearized PBRF. Two rows
         (30 and 34) stall at relative gradient norms 1–2e-2 on either path with this base
         model. A Woodbury update of the preconditioner for each removed example's own term
         saved no inner iteration and doubled the PBRF's time (124 s).
  paper  9,000 images, the paper's widths (d = 2.8M), batch 1024, 1000 epochs, wd 1e-5, R = 20,
         Q = 40; removed examples solved 5 at a time, training examples vmapped 1024 at a time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import data as datasets
from .base import GroundTruthConfig, Recipe, ScaleConfig, Splits, Task
from .losses import binary_cross_entropy


def autoencoder(n_in: int, widths: tuple[int, ...]) -> nn.Module:
    """n_in-w1-…-wk (code, linear)-…-w1-n_in, sigmoid hidden units, logits out."""
    sizes = (n_in, *widths, *reversed(widths[:-1]), n_in)
    code = len(widths)  # index in `sizes` of the code layer
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        layers.append(nn.Linear(a, b))
        if i != code and i != len(sizes) - 1:
            layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


_SCALES = {
    "smoke": ({"n_train": 64, "widths": (32, 16, 8), "pool": 2},
              Recipe("adam", epochs=50, batch_size=32, lr=0.03, weight_decay=2e-2, seed=0),
              GroundTruthConfig(n_removed=4, n_query=4, n_eval=32, pbrf_max_steps=10, dense_max_params=0,
                                nystrom_rank=400)),
    "cpu": ({"n_train": 1000, "widths": (32, 16, 8), "pool": 2},
            Recipe("adam", epochs=200, batch_size=128, lr=0.03, weight_decay=5e-3, seed=0),
            GroundTruthConfig(n_removed=40, n_query=40, n_eval=128, pbrf_max_steps=20, dense_max_params=0,
                              nystrom_rank=400)),
    "paper": ({"n_train": 9000, "widths": (1000, 500, 250, 30)},
              Recipe("sgd", epochs=1000, batch_size=1024, lr=0.01, momentum=0.9, weight_decay=1e-5, seed=0),
              GroundTruthConfig(n_removed=20, n_query=40, n_eval=500, removed_chunk=5, example_chunk=1024)),
}
N_QUERY_POOL = 1000


class MnistAutoencoder(Task):
    # at every scale by default since its cpu ground truth takes ~2 min (was 25: the dense G)
    name = "ae-mnist"
    version = 2  # 2: pooled images, Adam, smaller widths at smoke and cpu
    description = "deep autoencoder 784-1000-500-250-30 (sigmoid), MNIST, Bernoulli cross-entropy"

    def config(self, scale):
        params, recipe, gt = _SCALES[scale]
        return ScaleConfig(recipe=recipe, ground_truth=gt, params=params)

    def model(self, scale):
        params = self.config(scale).params
        return autoencoder(784 // params.get("pool", 1) ** 2, tuple(params["widths"]))

    loss = binary_cross_entropy

    def data(self, scale, data_root):
        x, _labels = datasets.load_mnist(data_root)
        x = torch.as_tensor(x).to(self.dtype) / 255.0
        pool = self.config(scale).params.get("pool", 1)
        if pool > 1:  # k×k average-pooled pixels, still in [0, 1]
            x = F.avg_pool2d(x.reshape(len(x), 1, 28, 28), pool)
        x = x.reshape(len(x), -1)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(4))
        query, pool = perm[:N_QUERY_POOL], perm[N_QUERY_POOL:]
        train = pool[:self.config(scale).params["n_train"]]
        return Splits(x[train], x[train], x[query], x[query])
