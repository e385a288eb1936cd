"""Scores against a ground truth (DESIGN.md §2).

Correlations compare predicted (Q, R) scores with true (Q, R) test-loss differences:
per query across the R removed examples, then the mean over queries (the main numbers);
pooled over all Q·R pairs; and a percentile bootstrap interval over removed examples.
A row with no variation (constant prediction) has correlation 0: it ranks nothing.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation along the last axis; 0 where either side is constant."""
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    denom = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    num = (a * b).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(denom > 0, num / np.where(denom > 0, denom, 1.0), 0.0)
    return np.clip(r, -1.0, 1.0)


def _rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return _rowwise_pearson(rankdata(a, axis=-1), rankdata(b, axis=-1))


def correlations(pred: np.ndarray, truth: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean per-query and pooled Pearson / Spearman, with 95 % bootstrap intervals of the means.

    pred, truth: (Q, R). The bootstrap resamples the R removed examples with replacement.
    """
    pred, truth = np.asarray(pred, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if pred.shape != truth.shape:
        raise ValueError(f"predicted scores have shape {pred.shape}, ground truth {truth.shape}")
    out = {
        "pearson": float(_rowwise_pearson(pred, truth).mean()),
        "spearman": float(_rowwise_spearman(pred, truth).mean()),
        "pearson_pooled": float(_rowwise_pearson(pred.ravel(), truth.ravel())),
        "spearman_pooled": float(_rowwise_spearman(pred.ravel(), truth.ravel())),
    }
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, pred.shape[1], size=(n_boot, pred.shape[1]))  # (B, R)
    p_b, t_b = pred[:, idx].transpose(1, 0, 2), truth[:, idx].transpose(1, 0, 2)  # (B, Q, R)
    for name, fn in (("pearson", _rowwise_pearson), ("spearman", _rowwise_spearman)):
        boot = fn(p_b, t_b).mean(-1)
        lo, hi = np.percentile(boot, [2.5, 97.5])
        out[f"{name}_ci"] = [float(lo), float(hi)]
    return out


def output_distance(outputs_a: np.ndarray, outputs_b: np.ndarray) -> np.ndarray:
    """d(θ_a, θ_b) per removed example: mean over inputs of ‖f_a(x) − f_b(x)‖₂.

    outputs_*: (R, n_eval, C) or (n_eval, C) (broadcast). Returns (R,).
    """
    diff = np.asarray(outputs_a, dtype=np.float64) - np.asarray(outputs_b, dtype=np.float64)
    return np.linalg.norm(diff, axis=-1).mean(-1)
