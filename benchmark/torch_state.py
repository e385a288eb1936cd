"""The process-wide state an estimator could change and every later row would inherit.

`capture()` reads it; `restore(state)` puts it back and returns the names of what had changed.
The harness wraps every row in both (benchmark/runner.py), so that a row that calls, say,
`torch.set_default_dtype(torch.float32)` or `torch.manual_seed(0)` in `fit` changes nothing for
the rows after it, and says so in its own result.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch


@dataclass(frozen=True)
class _Setting:
    """One piece of global state: how to read it, set it back, and compare two readings."""

    name: str
    read: Callable[[], Any]
    write: Callable[[Any], None]
    same: Callable[[Any, Any], bool] = lambda a, b: a == b


def _same_numpy_state(a, b) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and tuple(a[2:]) == tuple(b[2:])


def _deterministic() -> tuple[bool, bool]:
    return torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()


def _cuda_settings() -> list[_Setting]:
    if not torch.cuda.is_available():
        return []
    return [
        _Setting("torch CUDA RNG state", torch.cuda.get_rng_state_all, torch.cuda.set_rng_state_all,
                 lambda a, b: len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))),
        _Setting("cudnn.benchmark", lambda: torch.backends.cudnn.benchmark,
                 lambda v: setattr(torch.backends.cudnn, "benchmark", v)),
        _Setting("cudnn.deterministic", lambda: torch.backends.cudnn.deterministic,
                 lambda v: setattr(torch.backends.cudnn, "deterministic", v)),
        _Setting("cuda.matmul.allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32,
                 lambda v: setattr(torch.backends.cuda.matmul, "allow_tf32", v)),
    ]


SETTINGS: list[_Setting] = [
    _Setting("default dtype", torch.get_default_dtype, torch.set_default_dtype),
    _Setting("threads", torch.get_num_threads, torch.set_num_threads),
    _Setting("grad mode", torch.is_grad_enabled, torch.set_grad_enabled),
    _Setting("anomaly detection", torch.is_anomaly_enabled, torch.set_anomaly_enabled),
    _Setting("deterministic algorithms", _deterministic,
             lambda v: torch.use_deterministic_algorithms(v[0], warn_only=v[1])),
    _Setting("float32 matmul precision", torch.get_float32_matmul_precision, torch.set_float32_matmul_precision),
    _Setting("torch RNG state", torch.random.get_rng_state, torch.random.set_rng_state, torch.equal),
    _Setting("numpy RNG state", np.random.get_state, np.random.set_state, _same_numpy_state),
    _Setting("python random state", random.getstate, random.setstate),
    *_cuda_settings(),
]


def capture() -> dict[str, Any]:
    """The current value of every setting in SETTINGS."""
    return {s.name: s.read() for s in SETTINGS}


def restore(state: dict[str, Any]) -> list[str]:
    """Put back every setting that differs from `state`; returns the names of those, in order."""
    changed = []
    for s in SETTINGS:
        if not s.same(s.read(), state[s.name]):
            s.write(state[s.name])
            changed.append(s.name)
    return changed


__all__ = ["SETTINGS", "capture", "restore"]
