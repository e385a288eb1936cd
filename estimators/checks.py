"""Conformance checks for estimators, in the spirit of scikit-learn's `check_estimator`.

    from estimators.checks import check_estimator
    check_estimator(MyEstimator())                 # an unfitted instance, a class, or a spec:
    check_estimator("path/to/mine.py:MyEstimator")  # any spec `make_estimator` accepts

or from a shell: `python -m estimators.checks path/to/mine.py:MyEstimator`.

Every check runs on tiny float64 problems built here (no datasets, seconds in all):

- `linear_problem()`: a linear model f(θ, x) = θᵀx with squared error ℓᵢ = ½(θᵀxᵢ − tᵢ)² and θˢ
  the exact minimiser of (1/N) Σᵢ ℓᵢ + (wd/2)‖θ‖². Here ∇ℓᵢ = rᵢ xᵢ with rᵢ = θˢᵀxᵢ − tᵢ, the
  output Hessian is 1, so G = XᵀX/N exactly, and the linearized PBRF is in closed form:

      Δθ₋ₘ = ε A⁻¹ xₘ rₘ,   S[q, m] = ∇ℓ_qᵀ Δθ₋ₘ = ε r_q x_qᵀ A⁻¹ xₘ rₘ,   A = XᵀX/N + (wd + λ) I,

  with λ the estimator's own `damping` hyperparameter when it has one, else the problem's.
- `mlp_problem()`: a tanh MLP classifier (cross-entropy) with a registered buffer, briefly trained;
  it carries the generic checks (shapes, subsets, reproducibility, read-only problem).

`check_estimator(estimator, problem)` runs the generic checks on `problem` instead of the MLP
(the closed-form check always uses the linear problem). It returns {check name: "passed" or
"skipped: why"} and raises `EstimatorCheckError` listing every failed check.
"""
from __future__ import annotations

import copy
import random
import re
import traceback
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from benchmark.problem import Batch, FunctionalModel, Problem
from benchmark.training import lbfgs
from tasks.base import Recipe
from tasks.losses import cross_entropy, squared_error

from .base import Estimator, NotFittedError

DTYPE = torch.float64
#: columns / rows of a subset call must equal the full call's to this fraction of max |S|
#: (float64; float32 scores get SUBSET_RTOL_FLOAT32): solvers batched over right-hand sides may
#: differ by rounding only, unless the estimator states a larger `batch_rtol` (estimators/base.py)
SUBSET_RTOL = 1e-6
SUBSET_RTOL_FLOAT32 = 1e-3
#: curvature-aware estimators must match the closed form to this relative Frobenius error on the
#: linear problem. The check is about conventions, not accuracy (that is what the benchmark
#: measures): on `linear_problem()` (G's eigenvalues 0.22…2.4, wd + λ = 0.201) the convention
#: errors land far outside (a flipped sign 2, a missing ε ≈ 200, a factor 2 in the curvature 0.5,
#: forgetting wd in the damping 0.45, the best scalar curvature 0.75), while approximations land well
#: inside (exact, CG and arnoldi 1e-15, LiSSA's defaults 0.042 (depth 1000: 0.034), an exact diagonal
#: G 0.065, Hutchinson's diagonal with 20 probes 0.065; solving the PBRF instead of its linearisation:
#: leverages < 0.06)
CLOSED_FORM_RTOL = 0.25


class CheckFailed(AssertionError):
    """One conformance check failed."""


class EstimatorCheckError(AssertionError):
    """Some conformance checks failed; `failures` maps check name to message."""

    def __init__(self, name: str, failures: dict[str, str]):
        self.failures = failures
        lines = "\n".join(f"- {check}: {msg}" for check, msg in failures.items())
        super().__init__(f"{name} failed {len(failures)} conformance check(s):\n{lines}")


# ---- problems ----------------------------------------------------------------------------------

@dataclass
class LinearProblem:
    """The linear least-squares problem and its closed-form influence."""

    problem: Problem
    X: Tensor  # (N, p)
    t: Tensor  # (N,)
    theta: Tensor  # θˢ (p,)

    def closed_form_scores(self, train_idx: Tensor, damping: float | None = None) -> Tensor:
        """ε r_q x_qᵀ (XᵀX/N + (wd+λ)I)⁻¹ xₘ rₘ, (n_query, n_removed); λ defaults to the problem's."""
        p = self.problem
        lam = p.damping if damping is None else damping
        N, d = self.X.shape
        A = self.X.T @ self.X / N + (p.weight_decay + lam) * torch.eye(d, dtype=DTYPE)
        Xq, tq = p.query.inputs, p.query.targets[:, 0]
        g_q = (Xq @ self.theta - tq)[:, None] * Xq  # ∇ℓ_q = r_q x_q
        g_m = (self.X[train_idx] @ self.theta - self.t[train_idx])[:, None] * self.X[train_idx]
        return p.epsilon * g_q @ torch.linalg.solve(A, g_m.T)


def linear_problem(n_train: int = 200, n_features: int = 5, n_query: int = 6, weight_decay: float = 0.2,
                   damping: float = 1e-3, seed: int = 0) -> LinearProblem:
    """Least squares on Gaussian inputs with column scales 0.5…1.5, and a weight decay as large as
    G's smallest eigenvalue, so that a damping without it is visibly wrong."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.5, 1.5, n_features, dtype=DTYPE)
    X = torch.randn(n_train, n_features, generator=g, dtype=DTYPE) * scales
    true = torch.randn(n_features, generator=g, dtype=DTYPE)
    t = X @ true + 0.5 * torch.randn(n_train, generator=g, dtype=DTYPE)
    Xq = torch.randn(n_query, n_features, generator=g, dtype=DTYPE) * scales
    tq = Xq @ true + 0.5 * torch.randn(n_query, generator=g, dtype=DTYPE)
    theta = torch.linalg.solve(X.T @ X / n_train + weight_decay * torch.eye(n_features, dtype=DTYPE),
                               X.T @ t / n_train)
    model = FunctionalModel(nn.Linear(n_features, 1, bias=False).to(DTYPE))
    problem = Problem(task="check-linear", scale="smoke", model=model, params=theta.clone(),
                      train=Batch(X, t[:, None]), query=Batch(Xq, tq[:, None]), loss=squared_error,
                      damping=damping, weight_decay=weight_decay, seed=seed)
    return LinearProblem(problem, X, t, theta)


class _TinyMLP(nn.Module):
    """(x − shift) → Linear → tanh → Linear; `shift` is a buffer, so the read-only checks see one."""

    def __init__(self, n_in: int, hidden: int, n_out: int):
        super().__init__()
        self.register_buffer("shift", torch.linspace(-0.1, 0.1, n_in, dtype=DTYPE))
        self.hidden = nn.Linear(n_in, hidden).to(DTYPE)
        self.out = nn.Linear(hidden, n_out).to(DTYPE)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.hidden(x - self.shift)))


def mlp_problem(n_train: int = 48, n_query: int = 5, sizes: tuple[int, int, int] = (4, 6, 3),
                weight_decay: float = 1e-2, damping: float = 1e-3, seed: int = 0, train_steps: int = 30) -> Problem:
    """A small tanh MLP classifier, trained for a few full-batch L-BFGS steps (d = 51)."""
    g = torch.Generator().manual_seed(seed)
    n_in, hidden, n_out = sizes
    X = torch.randn(n_train, n_in, generator=g, dtype=DTYPE)
    y = torch.randint(n_out, (n_train,), generator=g)
    Xq = torch.randn(n_query, n_in, generator=g, dtype=DTYPE)
    yq = torch.randint(n_out, (n_query,), generator=g)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    module = _TinyMLP(n_in, hidden, n_out)
    torch.random.set_rng_state(state)
    model = FunctionalModel(module)
    theta = lbfgs(model, cross_entropy, Batch(X, y), model.flatten(),
                  Recipe("lbfgs", epochs=train_steps, weight_decay=weight_decay))
    return Problem(task="check-mlp", scale="smoke", model=model, params=theta, train=Batch(X, y),
                   query=Batch(Xq, yq), loss=cross_entropy, damping=damping, weight_decay=weight_decay,
                   seed=seed)


def removed_examples(problem: Problem, k: int = 6) -> Tensor:
    """k training indices spread over the training set (not sorted: order must not matter)."""
    n = problem.n_train
    idx = torch.linspace(0, n - 1, min(k, n)).round().long().unique()
    return idx.flip(0).to(problem.device)


# ---- the problem is read-only ------------------------------------------------------------------

def problem_state(problem: Problem) -> dict:
    """A copy of everything an estimator must not change: tensors (values, dtype, requires_grad),
    the module's parameters, buffers and training flags, and the scalar settings."""
    model = problem.model
    tensors = {"params": problem.params, "train inputs": problem.train.inputs,
               "train targets": problem.train.targets, "query inputs": problem.query.inputs,
               "query targets": problem.query.targets}
    if problem.theta0 is not None:
        tensors["theta0"] = problem.theta0
    tensors.update({f"buffer {k}": v for k, v in model.buffers.items()})
    tensors.update({f"module parameter {k}": v for k, v in model.module.named_parameters()})
    tensors.update({f"module buffer {k}": v for k, v in model.module.named_buffers()})
    return {
        "tensors": {k: (v.detach().clone(), v.requires_grad) for k, v in tensors.items()},
        "training": {name or "<model>": m.training for name, m in model.module.named_modules()},
        "settings": {k: getattr(problem, k) for k in ("damping", "weight_decay", "seed", "chunk_size", "task",
                                                       "scale")},
    }


def problem_changes(problem: Problem, before: dict) -> list[str]:
    """What differs between `problem` now and its earlier `problem_state` (empty: unchanged)."""
    now = problem_state(problem)
    changes = []
    for name, (old, old_rg) in before["tensors"].items():
        if name not in now["tensors"]:
            changes.append(f"{name} is gone")
            continue
        new, new_rg = now["tensors"][name]
        if old.shape != new.shape or old.dtype != new.dtype or old.device != new.device:
            changes.append(f"{name} changed from {old.dtype} {tuple(old.shape)} to {new.dtype} {tuple(new.shape)}")
        elif not torch.equal(old, new):
            changes.append(f"{name} values changed")
        if old_rg != new_rg:
            changes.append(f"{name}.requires_grad changed from {old_rg} to {new_rg}")
    changes += [f"{name} is new" for name in now["tensors"] if name not in before["tensors"]]
    for name, mode in before["training"].items():
        if now["training"].get(name, mode) != mode:
            changes.append(f"module {name} switched to {'train' if not mode else 'eval'} mode")
    for name, value in before["settings"].items():
        if now["settings"][name] != value:
            changes.append(f"problem.{name} changed from {value!r} to {now['settings'][name]!r}")
    return changes


# ---- helpers -------------------------------------------------------------------------------------

def _factory(estimator_or_spec) -> tuple[Callable[[], Estimator], str]:
    """A function making fresh unfitted copies, and a name for messages."""
    if isinstance(estimator_or_spec, str):
        from . import make_estimator
        make_estimator(estimator_or_spec)  # fail early on an unknown spec
        return (lambda: make_estimator(estimator_or_spec)), estimator_or_spec
    if isinstance(estimator_or_spec, type):
        return estimator_or_spec, estimator_or_spec.__name__
    template = copy.deepcopy(estimator_or_spec)
    return (lambda: copy.deepcopy(template)), repr(estimator_or_spec)


def _fail(message: str) -> None:
    raise CheckFailed(message)


def _fit(make: Callable[[], Estimator], problem: Problem) -> Estimator:
    estimator = make()
    estimator.fit(problem)
    return estimator


def _scores(estimator: Estimator, train_idx: Tensor, query: Batch) -> Tensor:
    S = estimator.scores(train_idx, query)
    if not isinstance(S, Tensor):
        _fail(f"scores() returned {type(S).__name__}, expected a torch.Tensor")
    return S.detach()


def _close(a: Tensor, b: Tensor, rtol: float) -> tuple[bool, float]:
    """max |a − b| ≤ rtol · max |b| (and the relative difference)."""
    a, b = a.to(torch.float64).cpu(), b.to(torch.float64).cpu()
    if a.shape != b.shape:
        return False, float("inf")
    scale = float(b.abs().max()) if b.numel() else 1.0
    diff = float((a - b).abs().max()) / (scale or 1.0) if a.numel() else 0.0
    return diff <= rtol, diff


def _subset_rtol(S: Tensor, estimator: Estimator) -> float:
    """What two calls may differ by: rounding (by S's dtype), or the estimator's own stated
    `batch_rtol` where that is larger (an iterative solve stopped at a tolerance)."""
    rounding = SUBSET_RTOL if S.dtype == torch.float64 else SUBSET_RTOL_FLOAT32
    return max(rounding, float(getattr(estimator, "batch_rtol", 0.0) or 0.0))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


class _single_thread:
    """Tiny problems run fastest on one thread (and far faster than on oversubscribed cores)."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


class CheckContext:
    """One estimator on one problem, with the work that several checks share done once:
    `fitted()` (a fitted estimator) and `full()` (its scores for `idx` × all queries)."""

    def __init__(self, make: Callable[[], Estimator], problem: Problem):
        self.make, self.problem = make, problem
        self.idx = removed_examples(problem)
        self.state = problem_state(problem)
        self.fit_changes: list[str] = []
        self._fitted: Estimator | None = None
        self._full: Tensor | None = None

    def fitted(self) -> Estimator:
        if self._fitted is None:
            self._fitted = _fit(self.make, self.problem)
            self.fit_changes = problem_changes(self.problem, self.state)
        return self._fitted

    def full(self) -> Tensor:
        if self._full is None:
            self._full = _scores(self.fitted(), self.idx, self.problem.query).clone()
        return self._full


# ---- the checks ----------------------------------------------------------------------------------

def check_not_fitted(ctx: CheckContext) -> None:
    """scores() (and parameter_change()) before fit() raise a clear error."""
    methods = ["scores"] + (["parameter_change"] if callable(getattr(ctx.make(), "parameter_change", None)) else [])
    for method in methods:
        estimator = ctx.make()
        args = (ctx.idx, ctx.problem.query) if method == "scores" else (ctx.idx,)
        try:
            getattr(estimator, method)(*args)
        except NotFittedError:
            continue
        except Exception as exc:
            message = str(exc).replace(type(estimator).__name__, "")
            if re.search(r"\bfit(ted)?\b", message, flags=re.IGNORECASE):
                continue  # e.g. "call fit() first", "not fitted"
            _fail(f"{method}() before fit() raised {type(exc).__name__}: {exc!s:.200} — not a clear error; raise "
                  "estimators.NotFittedError (the base class's `problem` property does) or say that fit() is needed")
        else:
            _fail(f"{method}() before fit() returned a value; it must raise estimators.NotFittedError")


def check_fit_returns_self(ctx: CheckContext) -> None:
    """fit(problem) returns the estimator itself."""
    estimator = ctx.make()
    out = estimator.fit(ctx.problem)
    if out is not estimator:
        _fail(f"fit() returned {type(out).__name__ if out is not None else 'None'}, not self")


def check_scores_contract(ctx: CheckContext) -> None:
    """scores(train_idx, query) is a floating tensor of shape (n_query, n_removed), all finite;
    also for one removed example and one query."""
    one_query = ctx.problem.query.subset(torch.arange(1, device=ctx.problem.query.inputs.device))
    for train_idx, query, S in ((ctx.idx, ctx.problem.query, ctx.full()),
                                (ctx.idx[:1], one_query, None)):
        S = _scores(ctx.fitted(), train_idx, query) if S is None else S
        expected = (len(query), len(train_idx))
        if tuple(S.shape) != expected:
            _fail(f"scores() for {expected[1]} removed example(s) and {expected[0]} queries returned shape "
                  f"{tuple(S.shape)}, expected (n_query, n_removed) = {expected}")
        if not S.is_floating_point():
            _fail(f"scores() returned dtype {S.dtype}, expected a floating dtype")
        if not torch.isfinite(S).all():
            _fail(f"scores() returned {int((~torch.isfinite(S)).sum())} non-finite values of {S.numel()}")


def check_removed_subset(ctx: CheckContext) -> None:
    """Scoring a subset of the removed examples, in another order, gives the full call's columns."""
    full = ctx.full()
    cols = torch.tensor([3, 0, 4]) % len(ctx.idx)
    part = _scores(ctx.fitted(), ctx.idx[cols.to(ctx.idx.device)], ctx.problem.query)
    tol = _subset_rtol(full, ctx.fitted())
    ok, diff = _close(part, full[:, cols.to(full.device)], tol)
    if not ok:
        _fail(f"scores for removed examples {ctx.idx[cols].tolist()} differ from the same columns of the full call "
              f"by {diff:.2e} of max |S| (allowed {tol:.0e}): a removed example's score must not "
              "depend on which others are scored with it")


def check_query_subset(ctx: CheckContext) -> None:
    """Scoring a subset of the queries, in another order, gives the full call's rows."""
    full = ctx.full()
    n = len(ctx.problem.query)
    rows = torch.tensor([n - 1, 0])
    part = _scores(ctx.fitted(), ctx.idx, ctx.problem.query.subset(rows.to(ctx.problem.query.inputs.device)))
    tol = _subset_rtol(full, ctx.fitted())
    ok, diff = _close(part, full[rows.to(full.device)], tol)
    if not ok:
        _fail(f"scores for queries {rows.tolist()} differ from the same rows of the full call by {diff:.2e} of "
              f"max |S| (allowed {tol:.0e})")


def check_reproducible(ctx: CheckContext) -> None:
    """A fresh copy, fit and scored after the global random generators are reseeded, gives
    scores identical to the first (randomness must come from the estimator's own seeded
    generator, or a parallel run, whose rows run in another order, would differ from a serial one)."""
    first = ctx.full()
    states = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        torch.manual_seed(54321)
        np.random.seed(54321)
        random.seed(54321)
        second = _scores(_fit(ctx.make, ctx.problem), ctx.idx, ctx.problem.query)
    finally:
        torch.random.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
    if first.shape != second.shape or not torch.equal(first, second):
        diff = float((first - second).abs().max()) if first.shape == second.shape else float("nan")
        _fail(f"two fits on the same problem gave different scores (max difference {diff:.2e}); seed any "
              "randomness from the estimator's `seed` hyperparameter and problem.seed with a torch.Generator")


def check_parameter_change(ctx: CheckContext) -> str | None:
    """For influence-function estimators: parameter_change(train_idx) is finite (n_removed, d) and
    the scores equal ∇ℓ_qᵀ Δθ₋ₘ."""
    if not callable(getattr(ctx.make(), "parameter_change", None)):
        return "skipped: no parameter_change()"
    p = ctx.problem
    delta = ctx.fitted().parameter_change(ctx.idx)
    if not isinstance(delta, Tensor) or tuple(delta.shape) != (len(ctx.idx), p.n_params):
        _fail(f"parameter_change() returned {tuple(getattr(delta, 'shape', ()))}, expected (n_removed, d) = "
              f"({len(ctx.idx)}, {p.n_params})")
    if not torch.isfinite(delta).all():
        _fail("parameter_change() returned non-finite values")
    expected = p.gradients(p.query) @ delta.detach().to(p.dtype).T
    ok, diff = _close(ctx.full(), expected, _subset_rtol(ctx.full(), ctx.fitted()))
    if not ok:
        _fail(f"scores() differ from ∇ℓ_qᵀ parameter_change() by {diff:.2e} of max |S|")
    return None


def check_closed_form(ctx: CheckContext) -> None:
    """On linear least squares (`linear_problem`, not the context's problem), the scores match the
    closed form ε r_q x_qᵀ (XᵀX/N + (wd+λ)I)⁻¹ xₘ rₘ to a relative error of CLOSED_FORM_RTOL, with
    λ the estimator's own `damping` if it sets one. An estimator with `uses_curvature = False`
    must instead correlate positively with it, per query on average and pooled: it should rank
    like the influence, not reproduce its values."""
    lin = linear_problem()
    p = lin.problem
    estimator = _fit(ctx.make, p)
    damping = estimator.get_params().get("damping") if callable(getattr(estimator, "get_params", None)) else None
    idx = removed_examples(p, 12)
    S = _scores(estimator, idx, p.query).to(torch.float64).cpu()
    exact = lin.closed_form_scores(idx.cpu(), damping)
    if S.shape != exact.shape:
        _fail(f"scores() returned shape {tuple(S.shape)}, expected {tuple(exact.shape)}")
    if getattr(estimator, "uses_curvature", True):
        err = float(torch.linalg.norm(S - exact) / torch.linalg.norm(exact))
        if not err <= CLOSED_FORM_RTOL:
            flipped = float(torch.linalg.norm(S + exact) / torch.linalg.norm(exact))
            hint = " (the sign is flipped: S[q, m] predicts ℓ_q(θ₋ₘ) − ℓ_q(θˢ))" if flipped < err else ""
            ratio = float((S * exact).sum() / (exact * exact).sum())
            _fail(f"scores differ from the closed-form influence by {err:.3g} relative (allowed "
                  f"{CLOSED_FORM_RTOL}); least-squares scale factor {ratio:.3g}{hint}")
    else:
        s, e = S.numpy(), exact.numpy()
        per_query = float(np.mean([_pearson(s[q], e[q]) for q in range(s.shape[0])]))
        pooled = _pearson(s.ravel(), e.ravel())
        if not (per_query > 0 and pooled > 0):
            _fail(f"a no-curvature estimator must correlate positively with the closed-form influence; mean "
                  f"per-query Pearson {per_query:.3f}, pooled {pooled:.3f}")


def check_get_params(ctx: CheckContext) -> str | None:
    """get_params() rebuilds an equal estimator, and fit() does not change the hyperparameters."""
    estimator = ctx.make()
    if not callable(getattr(estimator, "get_params", None)):
        return "skipped: no get_params()"
    params = estimator.get_params()
    try:
        clone = type(estimator)(**params)
    except Exception as exc:
        _fail(f"type(est)(**est.get_params()) raised {type(exc).__name__}: {exc}; store every __init__ argument "
              "under its own name")
    if repr(clone.get_params()) != repr(params):
        _fail(f"a clone from get_params() has different parameters: {clone.get_params()} != {params}")
    after = ctx.fitted().get_params()
    if repr(after) != repr(params):
        _fail(f"fit() changed the hyperparameters from {params} to {after}; store fitted state in attributes "
              "ending with '_'")
    return None


def check_problem_read_only(ctx: CheckContext) -> None:
    """fit() and every call so far left the problem as they found it: parameters, buffers, data,
    requires_grad flags, the module's training mode and the scalar settings (run it last)."""
    ctx.full()
    if ctx.fit_changes:
        _fail("fit() modified the problem: " + "; ".join(ctx.fit_changes))
    changes = problem_changes(ctx.problem, ctx.state)
    if changes:
        _fail("scoring modified the problem: " + "; ".join(changes))


#: every check, in the order check_estimator runs them
CHECKS: dict[str, Callable[[CheckContext], str | None]] = {
    "not_fitted": check_not_fitted,
    "fit_returns_self": check_fit_returns_self,
    "scores_contract": check_scores_contract,
    "removed_subset": check_removed_subset,
    "query_subset": check_query_subset,
    "reproducible": check_reproducible,
    "parameter_change": check_parameter_change,
    "closed_form": check_closed_form,
    "get_params": check_get_params,
    "problem_read_only": check_problem_read_only,
}


def run_check(name: str, ctx: CheckContext) -> str:
    """Run one check in a context; returns "passed" or "skipped: why", raises CheckFailed."""
    with _single_thread():
        return CHECKS[name](ctx) or "passed"


def check_context(estimator_or_spec, problem: Problem | None = None) -> CheckContext:
    """A context for `run_check`: the estimator (instance, class or spec) on `problem` (default:
    a fresh `mlp_problem()`)."""
    make, _ = _factory(estimator_or_spec)
    with _single_thread():
        return CheckContext(make, problem if problem is not None else mlp_problem())


def check_estimator(estimator_or_spec, problem: Problem | None = None, *, checks=None) -> dict[str, str]:
    """Run the conformance checks on an (unfitted) estimator, its class, or a spec string.

    problem: where the generic checks run (default: `mlp_problem()`); the closed-form check always
    uses `linear_problem()`. Returns {check: "passed" | "skipped: why"}; raises
    EstimatorCheckError naming every failed check and why.
    """
    _, name = _factory(estimator_or_spec)
    ctx = check_context(estimator_or_spec, problem)
    outcome, failures = {}, {}
    for check in checks or CHECKS:
        try:
            outcome[check] = run_check(check, ctx)
        except CheckFailed as exc:
            failures[check] = outcome[check] = f"FAILED: {exc}"
        except Exception as exc:
            tb = traceback.format_exc(limit=-3)
            failures[check] = outcome[check] = f"FAILED: the estimator raised {type(exc).__name__}: {exc}\n{tb}"
    if failures:
        raise EstimatorCheckError(name, failures)
    return outcome


def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m estimators.checks",
                                     description="Run the estimator conformance checks on estimator specs.")
    parser.add_argument("spec", nargs="+", help="registered name, package.module:Class or path/file.py:Class, "
                                                "optionally with arguments: 'lissa(depth=200)'")
    args = parser.parse_args(argv)
    status = 0
    for spec in args.spec:
        try:
            outcome = check_estimator(spec)
            print(f"{spec}: all checks passed")
            for check, result in outcome.items():
                print(f"  {check}: {result}")
        except EstimatorCheckError as exc:
            status = 1
            print(exc)
    return status


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["CHECKS", "CheckContext", "CheckFailed", "EstimatorCheckError", "LinearProblem", "check_context",
           "check_estimator", "linear_problem", "mlp_problem", "problem_changes", "problem_state",
           "removed_examples", "run_check"]
