"""`kronfluence-ekfac`, `kronfluence-kfac`: EK-FAC / K-FAC influence through kronfluence's Analyzer and
Task API (Grosse et al. 2023; `pip install -e ".[peers]"`).

Conventions, kronfluence's and how they become ours (S[q, m] = ε ∇ℓ_qᵀ (G + μI)⁻¹ ∇ℓₘ, μ = wd + λ):

- Scores. `Analyzer.compute_pairwise_scores` returns K[q, m] = ∇ℓ_qᵀ (F̂ + δI)⁻¹ ∇ℓₘ, gradients of the
  Task's `compute_measurement` and `compute_train_loss` for one example (our Task sums the per-example
  loss over a batch, so a row's gradient is the example's own ∇ℓ). Positive = removing m raises
  ℓ_q (kronfluence calls such an example "helpful"): the same sign as ours, no ε.
- Curvature. kronfluence fits its factors from the backward pass of `compute_train_loss(sample=True)`
  (the "true Fisher": labels sampled from the model), averaging over the rows of the fit data set:
  A = mean a aᵀ, S = mean s sᵀ, Λ = mean (Q_Sᵀ s aᵀ Q_A)². The adapter makes that Fisher the exact
  Gauss–Newton matrix instead of a Monte Carlo estimate, as estimators/kfac.py does: the fit data
  set holds each training input C times, row (i, c) carrying the c-th column r_c of Rᵢ (H_y,ᵢ = Rᵢ Rᵢᵀ,
  benchmark.problem.psd_sqrt), and `sample=True` returns Σ r_cᵀ f(x), whose output gradient is r_c.
  Averaging over N·C rows leaves A as it is and gives S/C and Λ/C.
- Damping. kronfluence adds `damping_factor` δ to Λ (EK-FAC) or to λ_S λ_Aᵀ (K-FAC), i.e. to the
  Kronecker product itself, as ours; the loss has no weight decay, so δ = μ/C = (wd + λ)/C, and then
  K = C ∇ℓ_qᵀ (Λ + μ)⁻¹ ∇ℓₘ: S = ε K / C.
- Parameters outside nn.Linear / nn.Conv2d are not tracked by kronfluence (they score 0), where our
  kfac gives them the block (1/μ) I: the two agree on models made of those layers only (the MLPs).
  Its convolutions are KFC as ours ("K-FAC-expand" positions).
- float64. Every dtype field of FactorArguments and ScoreArguments is set to float64 (kronfluence
  defaults to float32 factors, gradients and scores).

Fitting and scoring write kronfluence's factor and score files into a private temporary folder
(removed with the estimator). Evaluations are reported to `problem.counter` as kfac does: per
fit pass (covariance, and for EK-FAC the eigenvalues) a forward per example and a backward per
example and output column; per scored query or training example a forward and a gradient.
"""
from __future__ import annotations

import logging
import tempfile

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from benchmark.problem import Batch, Problem, output_hessians, psd_sqrt

from ..base import Estimator, effective_damping
from ._common import require

_STRATEGIES = ("ekfac", "kfac")


def _task(loss):
    """A kronfluence Task for a per-example loss (the class is made here so that importing this
    module does not import kronfluence)."""
    from kronfluence.task import Task

    class BenchmarkTask(Task):
        def compute_train_loss(self, batch, model, sample: bool = False) -> Tensor:
            inputs, targets = batch
            outputs = model(inputs)
            if sample:  # fit rows: targets are the GGN columns r (n, C); Σ r_cᵀ f has output gradient r_c
                return (outputs * targets).sum()
            return loss(outputs, targets).sum()

        def compute_measurement(self, batch, model) -> Tensor:
            inputs, targets = batch
            return loss(model(inputs), targets).sum()

    return BenchmarkTask()


class KronfluenceInfluence(Estimator):
    """kronfluence's EK-FAC (`strategy="ekfac"`) or K-FAC (`"kfac"`) on the exact Gauss–Newton matrix.

    batch_size: rows per kronfluence batch (fit and scoring)."""

    description = "kronfluence's EK-FAC / K-FAC (Analyzer API) on exact GGN pseudo-gradients, float64"

    def __init__(self, strategy: str = "ekfac", damping: float | None = None, batch_size: int = 256):
        require("kronfluence", "kronfluence", f"kronfluence-{strategy}")
        if strategy not in _STRATEGIES:
            raise ValueError(f"kronfluence adapter: strategy {strategy!r}; expected one of {_STRATEGIES}")
        self.strategy = strategy
        self.damping = damping
        self.batch_size = batch_size

    def fit(self, problem: Problem) -> "KronfluenceInfluence":
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments

        f64 = torch.float64
        inputs, targets = problem.train
        outputs = problem.outputs(inputs)
        R = psd_sqrt(output_hessians(problem.loss, outputs, targets))  # (N, C, C), columns r_c
        N, C = outputs.shape
        self.n_columns_ = C
        fit_rows = TensorDataset(inputs.repeat_interleave(C, dim=0), R.transpose(1, 2).reshape(N * C, C))
        self.workdir_ = tempfile.TemporaryDirectory(prefix="ifbench-kronfluence-")
        self.task_ = _task(problem.loss)
        model = prepare_model(problem.module(), self.task_)
        self.analyzer_ = Analyzer("benchmark", model, self.task_, cpu=problem.device.type == "cpu",
                                  log_level=logging.WARNING, disable_tqdm=True, output_dir=self.workdir_.name)
        args = FactorArguments(strategy=self.strategy, use_empirical_fisher=False, covariance_max_examples=None,
                               lambda_max_examples=None, activation_covariance_dtype=f64,
                               gradient_covariance_dtype=f64, eigendecomposition_dtype=f64,
                               per_sample_gradient_dtype=f64, lambda_dtype=f64)
        self.analyzer_.fit_all_factors("factors", fit_rows, per_device_batch_size=self.batch_size, factor_args=args,
                                       overwrite_output_dir=True)
        passes = 2 if self.strategy == "ekfac" else 1
        problem.counter.add("forward", passes * N)
        problem.counter.add("gradient", passes * N * C)
        self.mu_ = effective_damping(problem, self.damping)
        self.problem_ = problem
        return self

    def scores(self, train_idx: Tensor, query: Batch) -> Tensor:
        """S = ε K / C with kronfluence's K at damping μ/C (module docstring), (len(query), len(train_idx))."""
        from kronfluence.arguments import ScoreArguments

        p, f64, C = self.problem, torch.float64, self.n_columns_
        train = p.train.subset(train_idx.to(p.device))
        args = ScoreArguments(damping_factor=self.mu_ / C, per_sample_gradient_dtype=f64, precondition_dtype=f64,
                              score_dtype=f64, query_gradient_svd_dtype=f64)
        self.analyzer_.compute_pairwise_scores(
            "scores", "factors", query_dataset=TensorDataset(*query), train_dataset=TensorDataset(*train),
            per_device_query_batch_size=self.batch_size, per_device_train_batch_size=self.batch_size,
            score_args=args, overwrite_output_dir=True)
        K = self.analyzer_.load_pairwise_scores("scores")["all_modules"]
        p.counter.add("forward", len(query) + len(train))
        p.counter.add("gradient", len(query) + len(train))
        return p.epsilon * K.to(p.dtype) / C
