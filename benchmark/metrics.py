"""Scores against a ground truth (DESIGN.md §2).

Correlations compare predicted (Q, R) scores with true (Q, R) test-loss differences:
per query across the R removed examples, then the mean over queries (the main numbers);
pooled over all Q·R pairs; and a percentile bootstrap interval over removed examples.
A correlation with a constant (a query whose predictions, or whose true effects, do not vary
across the removed examples) is undefined, not 0: it is counted (`pearson_undefined`, ...) and
left out of the mean; a row with no defined query has no main number (None).
"""
from __future__ import annotations

import numpy as np

#: a side varies less than this fraction of its largest magnitude: constant (float rounding of a
#: constant array, e.g. the mean of R copies of 0.1, is not variation)
CONSTANT_RTOL = 1e-12


def _constant(a: np.ndarray) -> np.ndarray:
    """Along the last axis: no variation beyond rounding, (...,) bool."""
    spread = a.max(-1) - a.min(-1)
    return spread <= CONSTANT_RTOL * np.abs(a).max(-1)


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation along the last axis; NaN (undefined) where either side is constant."""
    undefined = _constant(a) | _constant(b)
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    denom = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    num = (a * b).sum(-1)
    ok = ~undefined & (denom > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(ok, num / np.where(ok, denom, 1.0), np.nan)
    return np.clip(r, -1.0, 1.0)


def average_ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n along the last axis, ties given the mean of the ranks they span, and a slice
    with a NaN all NaN (scipy.stats.rankdata(a, axis=-1), without importing scipy.stats: about
    0.9 s at the start of every process)."""
    a = np.asarray(a, dtype=np.float64)
    n = a.shape[-1]
    order = np.argsort(a, axis=-1, kind="stable")
    s = np.take_along_axis(a, order, axis=-1)
    pos = np.broadcast_to(np.arange(n), a.shape)
    starts = np.ones(a.shape, dtype=bool)  # first of a run of equal values
    starts[..., 1:] = s[..., 1:] != s[..., :-1]
    if starts.all():  # no ties: the position in sorted order
        sorted_ranks = pos + 1.0
    else:
        ends = np.ones(a.shape, dtype=bool)  # last of a run
        ends[..., :-1] = starts[..., 1:]
        first = np.maximum.accumulate(np.where(starts, pos, 0), axis=-1)
        last = np.flip(np.minimum.accumulate(np.flip(np.where(ends, pos, n - 1), -1), axis=-1), -1)
        sorted_ranks = (first + last) / 2.0 + 1.0
    ranks = np.empty(a.shape)
    np.put_along_axis(ranks, order, sorted_ranks, axis=-1)
    return np.where(np.isnan(a).any(-1, keepdims=True), np.nan, ranks)


def _rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return _rowwise_pearson(average_ranks(a), average_ranks(b))


def _mean_defined(r: np.ndarray) -> np.ndarray:
    """Mean over the last axis of the defined (finite) values; NaN where none is."""
    defined = np.isfinite(r)
    count = defined.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.where(defined, r, 0.0).sum(-1) / np.maximum(count, 1), np.nan)


def _value(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def correlations(pred: np.ndarray, truth: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean per-query and pooled Pearson / Spearman, with 95 % bootstrap intervals of the means.

    pred, truth: (Q, R). The bootstrap resamples the R removed examples with replacement; a
    resample where no query is defined is left out. Undefined numbers are None, and
    `pearson_undefined` / `spearman_undefined` count the queries left out of the means.
    """
    pred, truth = np.asarray(pred, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if pred.shape != truth.shape:
        raise ValueError(f"predicted scores have shape {pred.shape}, ground truth {truth.shape}")
    out = {"n_query_scored": int(pred.shape[0])}
    for name, fn in (("pearson", _rowwise_pearson), ("spearman", _rowwise_spearman)):
        per_query = fn(pred, truth)
        out[name] = _value(_mean_defined(per_query))
        out[f"{name}_undefined"] = int((~np.isfinite(per_query)).sum())
        out[f"{name}_pooled"] = _value(fn(pred.ravel(), truth.ravel()))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, pred.shape[1], size=(n_boot, pred.shape[1]))  # (B, R)
    p_b, t_b = pred[:, idx].transpose(1, 0, 2), truth[:, idx].transpose(1, 0, 2)  # (B, Q, R)
    for name, fn in (("pearson", _rowwise_pearson), ("spearman", _rowwise_spearman)):
        boot = _mean_defined(fn(p_b, t_b))
        boot = boot[np.isfinite(boot)]
        out[f"{name}_ci"] = [float(v) for v in np.percentile(boot, [2.5, 97.5])] \
            if out[name] is not None and boot.size else None
    return out


def output_distance(outputs_a: np.ndarray, outputs_b: np.ndarray) -> np.ndarray:
    """d(θ_a, θ_b) per removed example: mean over inputs of ‖f_a(x) − f_b(x)‖₂.

    outputs_*: (R, n_eval, C) or (n_eval, C) (broadcast). Returns (R,).
    """
    diff = np.asarray(outputs_a, dtype=np.float64) - np.asarray(outputs_b, dtype=np.float64)
    return np.linalg.norm(diff, axis=-1).mean(-1)
