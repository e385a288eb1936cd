"""Convolutional networks on MNIST and CIFAR-10: LeNet-5, AlexNet, VGG13 and ResNet-20 (paper §6).

Data. MNIST: the training pool is the same 6,000 of the 10,000 staged images as `mlp-mnist` (a
seeded permutation), queries come from the other 4,000 (never trained on). CIFAR-10: the staged
offline subset, 5,000 training images (500 per class; JPEG-recompressed unless the lossless copy
is staged), queries from its 10,000 test images. Pixels / 255, then standardised per channel
with the training pool's statistics; inputs (n, channels, H, W); cross-entropy on 10 logits.

Models (all ReLU, no dropout), "sized for 28×28 / 32×32 inputs":
  LeNet-5     conv5×5(c1) – maxpool – conv5×5(c2) – maxpool – fc f1 – fc f2 – fc 10 (the first conv
              pads by 2 on 28×28 inputs, so both datasets reach 5×5×c2); paper widths 6, 16, 120, 84.
  AlexNet     AlexNet's 5 conv + 3 fc layers for small images: conv5×5(c1) – pool – conv5×5(c2) –
              pool – conv3×3(c3) – conv3×3(c4) – conv3×3(c5) – pool – fc f1 – fc f2 – fc 10;
              paper widths 64, 192, 384, 256, 256 and fc 384, 192 (the CIFAR AlexNet of the
              TensorFlow tutorial / Zhang et al. 2017 sizes, not ImageNet's 4096).
  VGG13       the CIFAR VGG13 with batch norm: [64,64,M,128,128,M,256,256,M,512,512,M,512,512,M]
              of conv3×3–BN–ReLU, then fc 10; on 28×28 inputs the last max-pool is dropped (28 →
              14 → 7 → 3 → 1 after four).
  ResNet-20   He et al. (2016) CIFAR ResNet: conv3×3(w)–BN–ReLU, three stages of 3 basic blocks
              (w, 2w, 4w channels; stride 2 at the start of stages 2, 3; option-A identity
              shortcuts, zero-padded channels), global average pool, fc 10; paper w = 16.
Batch norm (VGG13, ResNet-20): the base model trains in train mode (benchmark.training updates
the running statistics); θˢ is stored with the final statistics, which every response function
and estimator then uses frozen (eval mode), but cold retraining, which repeats the base training
in train mode (benchmark.retraining).

Recipes (paper): SGD, batch 128, 200 epochs, weight decay 5e-4, damping 1e-3; MNIST with a
constant learning rate, CIFAR-10 with the learning rate ÷5 at epochs 60, 120, 160
(Zagoruyko & Komodakis 2016). Momentum 0.9 and lr 0.05 (MNIST) / 0.1 (CIFAR) are our choices
(the paper does not state them).

Scales (the tables below; times measured with one thread on the shared 2-core CPU, float64).
  smoke  64 training images, 2×2 average-pooled (14×14 MNIST, 16×16 CIFAR: on full-size images a
         LeNet Gauss–Newton product costs ~0.5 ms per example and vector here, and LiSSA's 1000
         steps alone took ~4 min per task), widths cut to d = 1.0k-2.6k (dense Gauss–Newton,
         exact and preconditioned), ResNet-8 (one block per stage) instead of ResNet-20, 50 epochs
         of batch 32, wd 2e-2, R = Q = 4, at most 10 PBRF steps. About 25-45 s per task with the
         four default estimators, LiSSA most of it. The PBRF converges for LeNet / AlexNet; for
         the batch-norm nets most rows end "stalled" or "diverged" (see _WEIGHT_DECAY).
  cpu    1,000 training images, 2×2 average-pooled like smoke (14×14 / 16×16), the cpu widths
         (d = 3.6k-9.9k: dense, exact solves), 50 epochs, wd 5e-3, R = Q = 40, damping 1e-3
         (CIFAR: 1e-2, see _CIFAR_DAMPING). Why pooled,
         measured (one thread, float64, LeNet over the 1,000 images): plain forward + backward
         0.456 s at 28×28 against 0.075 s at 14×14; a Gauss–Newton product 1.6 s against
         0.23 s. At 28×28 (R = 10) the LeNet-MNIST ground truth took 559 s with 5 of 10 rows
         certified and default LiSSA projected 69 min (benchmark.cost); pooled, R = 40: PBRF
         406 s (16 converged, 24 stalled at a median relative gradient norm 7e-4, none
         untrusted), its second solve 472 s (ceiling 0.995 [0.94, 1.00]), exact's Pearson 0.894;
         since de3e0ef (float32 products, preconditioned second solve, see _CPU_GT) 123 + 85 s,
         the same statuses and Pearson. Every CNN runs by default at cpu: the slowest, the
         ResNet-20s' pbrf-epochs ground truth, takes 15-19 min on one thread.
         The batch-norm nets are scored against `pbrf-epochs` (CNNTask.ground_truth).
  paper  the paper's widths and data (6,000 MNIST / 5,000 CIFAR images); d = 62k (LeNet-5) to
         9.4M (VGG13), so the ground truth goes through float64 CG without preconditioner. The
         removed examples are solved in chunks (`removed_chunk`) and training examples vmapped
         in chunks (`example_chunk`), chosen from the per-example float64 activation memory
         (LeNet ~0.15 MB, AlexNet ~4 MB, VGG13 / ResNet-20 ~6 MB with forward, tangent and
         backward) to stay well inside one 140 GB GPU (_PAPER_CHUNKS).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import data as datasets
from .base import GroundTruthConfig, Recipe, ScaleConfig, Splits, Task
from .losses import cross_entropy


# ---------------------------------------------------------------- models

def lenet(in_channels: int, size: int, c1: int, c2: int, f1: int, f2: int, n_out: int = 10) -> nn.Module:
    pad = 2 if size < 32 else 0  # LeNet-5 saw 32×32 inputs: 28×28 MNIST is padded to that
    side = ((size + 2 * pad - 4) // 2 - 4) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(c2 * side * side, f1), nn.ReLU(), nn.Linear(f1, f2), nn.ReLU(), nn.Linear(f2, n_out))


def alexnet(in_channels: int, size: int, channels: tuple[int, ...], fc: tuple[int, int],
            n_out: int = 10) -> nn.Module:
    """He-initialised (normal, fan-in, zero biases): with torch's default initialisation each of
    the eight layers shrinks the signal about 2× (measured at cpu widths: output std over inputs
    3e-4 at θ⁰) and SGD with weight decay stayed at the class prior (train loss 2.296, 11.5 %
    accuracy, for lr 0.01-0.2 and wd 0-5e-3); He-initialised (output std 0.39), the cpu recipe
    reaches 99.8 % train / 92 % query accuracy."""
    c1, c2, c3, c4, c5 = channels
    side = size // 8  # three 2×2 max-pools: 28 → 3, 32 → 4
    net = nn.Sequential(
        nn.Conv2d(in_channels, c1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c3, c4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c4, c5, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(c5 * side * side, fc[0]), nn.ReLU(), nn.Linear(fc[0], fc[1]), nn.ReLU(),
        nn.Linear(fc[1], n_out))
    for layer in net:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    return net


VGG13_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def vgg13(in_channels: int, size: int, width: float = 1.0, n_out: int = 10) -> nn.Module:
    """VGG13 with batch norm; channel counts × width (at least 1)."""
    layers: list[nn.Module] = []
    c, side = in_channels, size
    for item in VGG13_LAYOUT:
        if item == "M":
            if side < 2:  # 28 → 14 → 7 → 3 → 1: on 28×28 inputs the fifth pool is dropped
                continue
            layers.append(nn.MaxPool2d(2))
            side //= 2
        else:
            out = max(1, int(round(item * width)))
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            c = out
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c, n_out))


class _Shortcut(nn.Module):
    """Option A of He et al.: identity, subsampled by `stride`, channels zero-padded."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.stride, self.pad = stride, c_out - c_in

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = _Shortcut(c_in, c_out, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet-(6n+2): n basic blocks per stage, widths w, 2w, 4w."""

    def __init__(self, in_channels: int, width: int = 16, blocks: int = 3, n_out: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        layers, c = [], width
        for stage, w in enumerate((width, 2 * width, 4 * width)):
            for b in range(blocks):
                layers.append(BasicBlock(c, w, 2 if stage > 0 and b == 0 else 1))
                c = w
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(c, n_out)

    def forward(self, x: Tensor) -> Tensor:
        out = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(out.mean(dim=(2, 3)))


def resnet20(in_channels: int, size: int, width: int = 16, blocks: int = 3, n_out: int = 10) -> nn.Module:
    """ResNet-20 (blocks = 3 per stage); the smoke scale uses blocks = 1 (ResNet-8)."""
    return ResNet(in_channels, width, blocks, n_out)


# ---------------------------------------------------------------- scales

def _mnist_recipe(epochs: int, batch: int = 128, lr: float = 0.05, wd: float = 5e-4) -> Recipe:
    return Recipe("sgd", epochs=epochs, batch_size=batch, lr=lr, momentum=0.9, weight_decay=wd, seed=0)


def _cifar_recipe(epochs: int, batch: int = 128, lr: float = 0.1, wd: float = 5e-4) -> Recipe:
    # ÷5 at 30 %, 60 %, 80 % of training (epochs 60, 120, 160 of 200)
    milestones = tuple(sorted({max(1, round(epochs * f)) for f in (0.3, 0.6, 0.8)}))
    return Recipe("sgd", epochs=epochs, batch_size=batch, lr=lr, momentum=0.9, weight_decay=wd,
                  lr_milestones=milestones, lr_gamma=0.2, seed=0)


# Weight decay per scale. The PBRF's nonlinearity grows with ε/(wd + λ) (the size of the removal
# against the proximity term): 0.11 at the paper's N = 6,000 and wd = 5e-4. With N = 256 and the
# paper's wd the PBRF solve wandered off (measured: relative gradient norms growing to 1e2-1e7,
# every row stalled, 5 min). cpu: wd 5e-3 gives ε/(wd + λ) = 0.17. smoke (N = 64): wd 5e-2
# (ratio 0.3) left LeNet at chance (train loss 2.2, all outputs alike), so 2e-2 (ratio 0.74):
# LeNet trains to 56 % (train) and its PBRF converges. The batch-norm nets are harder at any
# small N: in eval mode their function is sharp (frozen statistics amplify weight changes, and
# depth multiplies them), and −ε ℓₘ outgrows the proximity term. Measured on ResNet / VGG13 at
# smoke, over N ∈ {64, 128, 256}, wd ∈ {1e-3 … 5e-2}, lr ∈ {0.01, 0.05}, ResNet-8 or -20, BN
# statistics recalibrated or not: at best 2-3 of 4 rows stop "stalled" (relative gradient norm
# 1e-2-1), the others "diverged". Why, measured (dense, at θˢ, smoke): the PBRF's Hessian
# G + (wd+λ)I − ε∇²ℓₘ has smallest eigenvalue −0.08 … −0.35 for VGG13-CIFAR's four removed
# examples (ε λ_min(∇²ℓₘ) = −0.2 … −1.0 against wd + λ = 0.021): θˢ sits at a saddle of the PBRF,
# there is no nearby minimum to find; LeNet-CIFAR's is +0.006 (ε λ_min(∇²ℓₘ) = −0.015). A local
# minimum would need ε |λ_min(∇²ℓₘ)| < wd + λ, i.e. N in the thousands or wd ≈ 1. The smoke rows
# of these nets run every estimator with its checks but are unscored ("no ground truth").
_WEIGHT_DECAY = {"smoke": 2e-2, "cpu": 5e-3, "paper": 5e-4}
# CIFAR-10 at cpu: damping λ = 1e-2 (not 1e-3), so wd + λ = 0.015 and ε/(wd + λ) = 0.067 (the
# paper's 0.11 sits between). A 1,000-image CIFAR net does not fit its training set (LeNet's
# losses at θˢ 0.4-2.9), and a hard example's −ε∇²ℓₘ outweighs wd + λ = 6e-3: measured on LeNet
# (Lanczos on G + (wd+λ)I − ε∇²ℓₘ at θˢ, dense G, the first 6 removed examples),
# λ_min = +0.0014 … +0.0024 for four and −0.0035 for the two with losses 1.2 and 2.9 (saddles),
# and its PBRF solve had rows rising past relative gradient norm 4 after 12 min. A larger weight
# decay instead stops training: at wd 2e-2 LeNet's losses were 2.1-2.4 (chance: 2.30) and AlexNet
# collapsed to the class prior. The damping changes no training, only the response functions.
_CIFAR_DAMPING = {"cpu": 1e-2}
# Nets without batch norm scored against `pbrf-epochs` at a scale, for the same reason as the
# batch-norm nets. AlexNet-CIFAR at cpu: with λ = 1e-2, θˢ is still a saddle of the PBRF for
# one of its first four removed examples (Lanczos, dense G: λ_min = −0.0042), and the batched
# Gauss–Newton solve of its 40 rows took 264 s a step, at a max relative gradient norm of 2.85,
# 2.07, 1.43, 1.28 after steps 1-4 (943 s; one thread, the other core busy): the minimiser is
# not there for every row, and the solve that looks for it would take hours.
_PBRF_EPOCHS_AT = {("alexnet", "cifar"): ("cpu",)}


_SMOKE_GT = GroundTruthConfig(n_removed=4, n_query=4, n_eval=32, pbrf_max_steps=10)
# cpu: the PBRF's inner Gauss–Newton products in float32 and the second solve preconditioned by
# (G + μI)⁻¹ (dense G: d ≤ 16,384). Both keep float64 objectives, gradients and certificates, and
# only the tasks scored against `pbrf` use them (LeNet ×2, AlexNet-MNIST; pbrf-epochs has neither
# solve). Measured on lenet-mnist's 40 rows, one thread, Intel Xeon, the same base model:
# PBRF 189 s → 131 s (float32 products; same statuses, converged rows' scores equal to 2e-10,
# stalled rows' to 1e-6, one to 1.1e-3); the second solve of its 8 rows 332 s → 82 s (3,945 →
# 863 evaluations; the same 2 converged, 6 stalled at relative gradient norms 2e-4 … 0.13
# against 2e-4 … 0.07; their distance to the first solve max 0.16 → 0.014).
_CPU_GT = GroundTruthConfig(n_removed=40, n_query=40, n_eval=128, gauss_newton_dtype="float32",
                            second_solve_preconditioned=True)


def _paper_gt(removed_chunk: int, example_chunk: int) -> GroundTruthConfig:
    return GroundTruthConfig(n_removed=20, n_query=40, n_eval=1000, removed_chunk=removed_chunk,
                             example_chunk=example_chunk)


# architecture -> scale -> model keyword arguments; n_train per scale; recipe per (dataset, scale)
# d (MNIST / CIFAR) at smoke: LeNet 1.1k/1.5k, AlexNet 1.0k/1.2k, VGG13 2.5k/2.6k, ResNet-8 1.3k/1.4k
#                  at cpu:   LeNet 3.6k/5.0k, AlexNet 7.9k/9.3k, VGG13 9.6k/9.7k, ResNet-20 9.8k/9.9k (pooled images)
#                  at paper: LeNet 62k, AlexNet 3.4M/4.1M, VGG13 9.4M, ResNet-20 269k
_ARCH = {
    "lenet": (lenet, {
        "smoke": {"c1": 4, "c2": 8, "f1": 8, "f2": 8},
        "cpu": {"c1": 6, "c2": 16, "f1": 24, "f2": 16},
        "paper": {"c1": 6, "c2": 16, "f1": 120, "f2": 84},
    }),
    "alexnet": (alexnet, {
        "smoke": {"channels": (2, 4, 6, 4, 4), "fc": (8, 8)},
        "cpu": {"channels": (6, 12, 16, 12, 12), "fc": (32, 16)},
        "paper": {"channels": (64, 192, 384, 256, 256), "fc": (384, 192)},
    }),
    "vgg13": (vgg13, {
        "smoke": {"width": 1 / 64},
        "cpu": {"width": 1 / 32},
        "paper": {"width": 1.0},
    }),
    "resnet20": (resnet20, {
        "smoke": {"width": 2, "blocks": 1},
        "cpu": {"width": 3},
        "paper": {"width": 16},
    }),
}
_N_TRAIN = {"smoke": 64, "cpu": 1000, "paper": None}  # None: the whole pool (6,000 / 5,000)
# smoke only: images 2×2 average-pooled (14×14 MNIST, 16×16 CIFAR), the nets built for that size
# (see the module docstring for why).
_DOWNSAMPLE = {"smoke": 2, "cpu": 2, "paper": 1}
# paper-scale memory: (removed_chunk, example_chunk) per architecture, for ~140 GB of GPU memory
# in float64: a vmapped Gauss–Newton product holds about removed_chunk × example_chunk × (the
# per-example activations, forward and backward).
_PAPER_CHUNKS = {"lenet": (20, 1024), "alexnet": (10, 256), "vgg13": (5, 128), "resnet20": (5, 128)}


#: the architectures with batch norm
_BATCH_NORM = ("vgg13", "resnet20")


class CNNTask(Task):
    arch: str
    dataset: str  # "mnist" or "cifar"
    version = 1

    @property
    def _geometry(self) -> tuple[int, int]:
        return (1, 28) if self.dataset == "mnist" else (3, 32)

    def config(self, scale):
        params = {"n_train": _N_TRAIN[scale], "downsample": _DOWNSAMPLE[scale], **_ARCH[self.arch][1][scale]}
        epochs = {"smoke": 50, "cpu": 50, "paper": 200}[scale]
        batch = 32 if scale == "smoke" else 128
        wd = _WEIGHT_DECAY[scale]
        recipe = _mnist_recipe(epochs, batch, wd=wd) if self.dataset == "mnist" else _cifar_recipe(epochs, batch, wd=wd)
        gt = {"smoke": _SMOKE_GT, "cpu": _CPU_GT, "paper": _paper_gt(*_PAPER_CHUNKS[self.arch])}[scale]
        return ScaleConfig(recipe=recipe, ground_truth=gt, params=params)

    def damping_at(self, scale):
        return _CIFAR_DAMPING.get(scale, self.damping) if self.dataset == "cifar" else self.damping

    @property
    def batch_norm(self) -> bool:
        return self.arch in _BATCH_NORM

    def ground_truth(self, scale):
        """VGG13 and ResNet-20 (batch norm): `pbrf-epochs`, the paper's protocol, at every scale.
        θˢ is a saddle of their PBRF at smoke and cpu (see _WEIGHT_DECAY), so its minimiser does
        not exist there; at paper scale it is unmeasured (`--ground-truth pbrf` asks for it).
        AlexNet-CIFAR at cpu too (_PBRF_EPOCHS_AT); the others: `pbrf`."""
        saddle = self.arch in _BATCH_NORM or scale in _PBRF_EPOCHS_AT.get((self.arch, self.dataset), ())
        return "pbrf-epochs" if saddle else "pbrf"

    def model(self, scale):
        build, widths = _ARCH[self.arch]
        c, size = self._geometry
        return build(c, size // _DOWNSAMPLE[scale], **widths[scale])

    loss = cross_entropy

    def _pools(self, data_root) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(train pool x uint8 (n, H, W, C), y, query pool x, y)."""
        if self.dataset == "mnist":
            x, y = (torch.as_tensor(a) for a in datasets.load_mnist(data_root))
            perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))  # as mlp-mnist
            pool, held_out = perm[:6000], perm[6000:]
            x = x[..., None]
            return x[pool], y[pool], x[held_out], y[held_out]
        d = datasets.load_cifar10(data_root)
        return tuple(torch.as_tensor(d[k]) for k in ("x_train", "y_train", "x_test", "y_test"))

    def data(self, scale, data_root):
        x_pool, y_pool, x_q, y_q = self._pools(data_root)
        n = self.config(scale).params["n_train"] or len(x_pool)
        g = torch.Generator().manual_seed(0)
        train = torch.randperm(len(x_pool), generator=g)[:n]
        query = torch.randperm(len(x_q), generator=g)[:1000]
        k = self.config(scale).params["downsample"]
        as_float = lambda x: F.avg_pool2d(x.permute(0, 3, 1, 2).to(self.dtype) / 255.0, k) if k > 1 else \
            x.permute(0, 3, 1, 2).to(self.dtype) / 255.0
        x_train, x_query = as_float(x_pool[train]), as_float(x_q[query])
        mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
        std = x_train.std(dim=(0, 2, 3), keepdim=True)
        return Splits((x_train - mean) / std, y_pool[train], (x_query - mean) / std, y_q[query])


#: task versions other than 1 (every cache entry depends on it): AlexNet 2, He initialisation
_VERSION = {"alexnet": 2}


def _task(arch: str, dataset: str, title: str) -> type[CNNTask]:
    data_name = {"mnist": "MNIST (6,000-image subset)", "cifar": "CIFAR-10 (5,000-image offline subset)"}[dataset]
    return type(f"{arch.capitalize()}{dataset.capitalize()}", (CNNTask,), {
        "name": f"{arch}-{dataset}", "arch": arch, "dataset": dataset, "version": _VERSION.get(arch, 1),
        "description": f"{title}, {data_name}", "__module__": __name__})


LeNetMnist = _task("lenet", "mnist", "LeNet-5")
AlexNetMnist = _task("alexnet", "mnist", "AlexNet (small-image)")
VGG13Mnist = _task("vgg13", "mnist", "VGG13 with batch norm")
ResNet20Mnist = _task("resnet20", "mnist", "ResNet-20")
LeNetCifar = _task("lenet", "cifar", "LeNet-5")
AlexNetCifar = _task("alexnet", "cifar", "AlexNet (small-image)")
VGG13Cifar = _task("vgg13", "cifar", "VGG13 with batch norm")
ResNet20Cifar = _task("resnet20", "cifar", "ResNet-20")

CNN_TASKS = (LeNetMnist, AlexNetMnist, VGG13Mnist, ResNet20Mnist, LeNetCifar, AlexNetCifar, VGG13Cifar,
             ResNet20Cifar)
