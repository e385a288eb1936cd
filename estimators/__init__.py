"""Estimators and their registry.

A registry entry is a name and a factory; damping variants are entries of their own.
`make_estimator(spec)` accepts a registered name, `package.module:Class` or
`path/to/file.py:Class`.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from functools import partial
from pathlib import Path
from typing import Callable

from .base import Estimator, NotFittedError, ParameterEstimator
from .cg import CG
from .exact import Exact
from .grad_dot import GradDot
from .lissa import LiSSA

REGISTRY: dict[str, Callable[[], Estimator]] = {
    "exact": Exact,
    "cg": CG,
    "lissa": LiSSA,
    "grad-dot": GradDot,
    "exact-damp1e-2": partial(Exact, damping=1e-2),
    "cg-damp1e-2": partial(CG, damping=1e-2),
    "lissa-damp1e-2": partial(LiSSA, damping=1e-2),
}

#: the estimators the benchmark runs when none is named
DEFAULT_ESTIMATORS = ("exact", "cg", "lissa", "grad-dot")


class UnknownEstimator(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def _load_class(spec: str) -> type:
    target, _, cls_name = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise UnknownEstimator(f"estimator file {path} does not exist (from {spec!r})")
        module_name = f"_ifbench_user_{path.stem}_{abs(hash(path.resolve()))}"
        spec_ = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec_)
        sys.modules[module_name] = module
        spec_.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise UnknownEstimator(f"cannot import module {target!r} for estimator {spec!r}: {exc}") from exc
    if not hasattr(module, cls_name):
        raise UnknownEstimator(f"{target} has no class {cls_name!r} (from estimator {spec!r})")
    return getattr(module, cls_name)


def make_estimator(spec: str, **params) -> Estimator:
    """A new estimator from a registered name, `package.module:Class` or `file.py:Class`."""
    if ":" in spec:
        factory = _load_class(spec)
    elif spec in REGISTRY:
        factory = REGISTRY[spec]
    else:
        from tasks import did_you_mean
        raise UnknownEstimator(f"unknown estimator {spec!r}.{did_you_mean(spec, REGISTRY)} Registered: "
                               f"{', '.join(REGISTRY)}; or give package.module:Class or path/to/file.py:Class")
    estimator = factory(**params)
    if not all(callable(getattr(estimator, m, None)) for m in ("fit", "scores")):
        raise TypeError(f"{spec!r} does not follow the estimator contract: it needs fit(problem) and "
                        "scores(train_idx, query) (see estimators/base.py)")
    return estimator


__all__ = ["REGISTRY", "DEFAULT_ESTIMATORS", "Estimator", "ParameterEstimator", "NotFittedError",
           "UnknownEstimator", "make_estimator", "CG", "Exact", "GradDot", "LiSSA"]
