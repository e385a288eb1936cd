"""Estimators and their registry.

A registry entry is a name and a factory; damping variants are entries of their own.
`make_estimator(spec)` accepts a registered name, `package.module:Class` or
`path/to/file.py:Class`, optionally followed by constructor arguments as Python literals in
call syntax: `lissa(depth=200, batch_size=64)`, `my_pkg.est:Mine(alpha=0.5)`.
`canonical_spec` writes a spec with its arguments in one normal form (sorted keys, no spaces):
it names the row in results, test ids and the baseline.
"""
from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
import sys
from functools import partial
from pathlib import Path
from typing import Callable

from .base import Estimator, NotFittedError, ParameterEstimator
from .arnoldi import Arnoldi
from .cg import CG
from .datainf import DataInf
from .exact import Exact
from .grad_dot import GradCos, GradDot
from .kfac import KFAC
from .lissa import LiSSA
from .tracin import TracIn
from .trak import TRAK
from .adapters import PEER_REGISTRY

REGISTRY: dict[str, Callable[[], Estimator]] = {
    "exact": Exact,
    "cg": CG,
    "lissa": LiSSA,
    "grad-dot": GradDot,
    "arnoldi": Arnoldi,
    "trak": TRAK,
    "grad-cos": GradCos,
    "datainf": DataInf,
    "exact-damp1e-2": partial(Exact, damping=1e-2),
    "cg-damp1e-2": partial(CG, damping=1e-2),
    "lissa-damp1e-2": partial(LiSSA, damping=1e-2),
    # LiSSA truncated at depth J damps by about s/J extra; a deeper recursion shows the cost of
    # removing that bias (the default depth ⌈s/μ⌉ leaves up to μ of it)
    "lissa-depth5000": partial(LiSSA, depth=5000),
    "kfac": KFAC,
    "ekfac": partial(KFAC, eigenvalue_correction=True),
    "tracin": TracIn,
}

#: the estimators the benchmark runs when none is named
DEFAULT_ESTIMATORS = ("exact", "cg", "lissa", "grad-dot")


class UnknownEstimator(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class EstimatorSpecError(ValueError):
    """A malformed spec or a constructor argument the estimator does not take."""


def parse_spec(spec: str) -> tuple[str, dict]:
    """'lissa(depth=200)' -> ('lissa', {'depth': 200}); a spec without arguments -> (spec, {}).

    Arguments are keywords with Python literal values (numbers, strings, None, True/False,
    tuples, lists, dicts). The argument list starts at the first '(' after which the rest of the
    spec parses as a call, so a path holding parentheses still works.
    """
    spec = spec.strip()
    if not spec.endswith(")"):
        if "(" in spec and ":" not in spec:  # a registered name never holds "("
            raise EstimatorSpecError(f"estimator spec {spec!r}: unbalanced parentheses; expected "
                                     "NAME(key=value, ...) with Python literal values")
        return spec, {}
    error = None
    for i, ch in enumerate(spec):
        if ch != "(" or i == 0:
            continue
        try:
            call = ast.parse("f" + spec[i:], mode="eval").body
        except SyntaxError as exc:
            error = exc
            continue
        if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
            continue
        if call.args or any(kw.arg is None for kw in call.keywords):
            raise EstimatorSpecError(f"estimator spec {spec!r}: give arguments as keywords, e.g. lissa(depth=200)")
        params = {}
        for kw in call.keywords:
            try:
                params[kw.arg] = ast.literal_eval(kw.value)
            except ValueError:
                raise EstimatorSpecError(f"estimator spec {spec!r}: the value of {kw.arg!r} "
                                         f"({ast.unparse(kw.value)}) is not a Python literal; quote strings, "
                                         "e.g. solver='dense'") from None
        return spec[:i].strip(), params
    raise EstimatorSpecError(f"estimator spec {spec!r}: cannot parse its arguments ({error}); expected "
                             "NAME(key=value, ...) with Python literal values")


def parse_param(text: str) -> tuple[str, object]:
    """'depth=200' -> ('depth', 200). The value is a Python literal; anything else is a string."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise EstimatorSpecError(f"estimator parameter {text!r}: expected KEY=VALUE, e.g. depth=200")
    try:
        return key, ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        return key, value.strip()


def format_spec(base: str, params: dict) -> str:
    """The canonical spelling: base(k1=v1,k2=v2) with sorted keys and repr'd values."""
    if not params:
        return base
    return f"{base}({','.join(f'{k}={params[k]!r}' for k in sorted(params))})"


def canonical_spec(spec: str, params: dict | None = None) -> str:
    """`spec` with `params` added on top of its own arguments, in canonical form."""
    base, own = parse_spec(spec)
    return format_spec(base, {**own, **(params or {})})


_MODULES: dict[tuple, object] = {}


def _load_file(path: Path, spec: str):
    """Import a .py file once per (path, modification time) under a stable module name."""
    if not path.is_file():
        raise UnknownEstimator(f"estimator file {path} does not exist (from {spec!r})")
    resolved = path.resolve()
    stamp = (str(resolved), resolved.stat().st_mtime_ns)
    if stamp not in _MODULES:
        digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
        module_name = f"_ifbench_user_{path.stem}_{digest}"
        spec_ = importlib.util.spec_from_file_location(module_name, resolved)
        module = importlib.util.module_from_spec(spec_)
        sys.modules[module_name] = module
        try:
            spec_.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(module_name, None)
            raise
        _MODULES[stamp] = module
    return _MODULES[stamp]


def _load_class(spec: str) -> type:
    target, _, cls_name = spec.rpartition(":")
    if target.endswith(".py"):
        module = _load_file(Path(target), spec)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise UnknownEstimator(f"cannot import module {target!r} for estimator {spec!r}: {exc}") from exc
    if not hasattr(module, cls_name):
        raise UnknownEstimator(f"{target} has no class {cls_name!r} (from estimator {spec!r})")
    return getattr(module, cls_name)


def _check_arguments(factory, params: dict, spec: str) -> None:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return  # not introspectable: let the constructor decide
    try:
        signature.bind_partial(**params)
    except TypeError:
        accepted = [n for n, p in signature.parameters.items()
                    if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = [k for k in params if k not in accepted]
        raise EstimatorSpecError(f"estimator {spec!r} takes no parameter {', '.join(map(repr, unknown))}; "
                                 f"its parameters: {', '.join(accepted) or 'none'}") from None


def make_estimator(spec: str, **params) -> Estimator:
    """A new estimator from a registered name, `package.module:Class` or `file.py:Class`,
    optionally with arguments `spec(key=value, ...)`; keyword `params` are added on top."""
    base, own = parse_spec(spec)
    params = {**own, **params}
    if ":" in base:
        factory = _load_class(base)
    elif base in REGISTRY:
        factory = REGISTRY[base]
    elif base in PEER_REGISTRY:  # adapters to peer libraries (estimators/adapters; the "peers" extra)
        factory = PEER_REGISTRY[base]
    else:
        from tasks import did_you_mean
        known = {**REGISTRY, **PEER_REGISTRY}
        raise UnknownEstimator(f"unknown estimator {base!r}.{did_you_mean(base, known)} Registered: "
                               f"{', '.join(known)}; or give package.module:Class or path/to/file.py:Class")
    _check_arguments(factory, params, spec)
    estimator = factory(**params)
    if not all(callable(getattr(estimator, m, None)) for m in ("fit", "scores")):
        raise TypeError(f"{spec!r} does not follow the estimator contract: it needs fit(problem) and "
                        "scores(train_idx, query) (see estimators/base.py)")
    return estimator


__all__ = ["REGISTRY", "PEER_REGISTRY", "DEFAULT_ESTIMATORS", "Estimator", "ParameterEstimator", "NotFittedError",
           "UnknownEstimator", "EstimatorSpecError", "make_estimator", "parse_spec", "parse_param", "format_spec",
           "canonical_spec", "Arnoldi", "CG", "DataInf", "Exact", "GradCos", "GradDot", "KFAC", "LiSSA", "TRAK",
           "TracIn"]
