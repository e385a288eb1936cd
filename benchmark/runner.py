"""Scoring one estimator on one task: the benchmark's unit of work (a row).

A row never raises for an estimator's fault: an exception, NaN scores, a wrong shape or a
modified problem make a failed row with the reason, and the other rows go on.
"""
from __future__ import annotations

import datetime
import gc
import json
import logging
import platform
import re
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from estimators import ParameterEstimator, canonical_spec, make_estimator, parse_spec
from tasks import check_scale, get_task

from . import guard, retraining, torch_state
from .cache import Cache, atomic_write_text
from .ground_truth import (RESPONSES, SECOND_SOLVE, GroundTruth, build_problem, error_bar, load_ground_truth,
                           status_counts, untrusted_rows)
from .measure import machine_load, measure
from .metrics import correlations, output_distance
from .problem import Batch, Problem, TimeBudgetExceeded

log = logging.getLogger("ifbench")

REPO = Path(__file__).resolve().parent.parent


#: fewer trusted removed examples than this and no correlation is measured
MIN_TRUSTED_REMOVED = 3


class NoGroundTruth(RuntimeError):
    """Too few removed examples have a local solution of the response function at this scale."""


class UndefinedCorrelation(RuntimeError):
    """Every query's correlation is undefined (constant scores or constant truth)."""


class EstimatorFailure(RuntimeError):
    """The estimator misbehaved (its own error, bad output, or it changed the problem)."""


@dataclass
class Settings:
    scale: str = "cpu"
    device: str = "cpu"
    cache_dir: Path | None = None
    data_root: Path | None = None
    results_dir: Path | None = None
    #: the response function scored against; None: each task's own (Task.ground_truth: the PBRF,
    #: pbrf-epochs for the batch-norm nets)
    ground_truth: str | None = None
    #: spec -> constructor arguments added to that spec's own (`lissa(depth=200)`); the row is
    #: named by the combined canonical spec
    estimator_params: dict = field(default_factory=dict)
    #: seconds of fit + scores allowed per row (None: no limit); see Session._score
    time_budget: float | None = None
    #: the accuracy guard's baseline (benchmark/guard.py); None: no guard
    baseline: Path | None = None


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        # generated results and pages under leaderboard/ do not make the code "dirty"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!leaderboard"],
                               cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _snapshot(problem: Problem) -> list[torch.Tensor]:
    tensors = [problem.params, problem.train.inputs, problem.train.targets, problem.query.inputs,
               problem.query.targets, *problem.model.buffers.values()]
    return [t.detach().clone() for t in tensors]


def _restore_if_changed(problem: Problem, snapshot: list[torch.Tensor]) -> list[str]:
    """Put back every problem tensor that differs from `snapshot`; returns the names of those."""
    now = [problem.params, problem.train.inputs, problem.train.targets, problem.query.inputs,
           problem.query.targets, *problem.model.buffers.values()]
    names = ["params", "train inputs", "train targets", "query inputs", "query targets",
             *(f"buffer {k}" for k in problem.model.buffers)]
    changed = [name for name, before, after in zip(names, snapshot, now)
               if before.shape != after.shape or not torch.equal(before, after)]
    if changed:
        params, x_tr, y_tr, x_q, y_q, *buffers = (t.clone() for t in snapshot)
        problem.params = params
        problem.train, problem.query = Batch(x_tr, y_tr), Batch(x_q, y_q)
        for key, value in zip(list(problem.model.buffers), buffers):
            problem.model.buffers[key] = value
    return changed


def _check_unchanged(problem: Problem, snapshot: list[torch.Tensor]) -> None:
    changed = _restore_if_changed(problem, snapshot)
    if changed:
        raise EstimatorFailure(f"the estimator modified the problem's {', '.join(changed)}; estimators must "
                               "treat the problem as read-only (clone tensors before changing them)")


def _as_scores(value, n_query: int, n_removed: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise EstimatorFailure(f"scores() returned {type(value).__name__}, expected a torch.Tensor of shape "
                               f"(n_query, n_removed) = ({n_query}, {n_removed})")
    if tuple(value.shape) != (n_query, n_removed):
        raise EstimatorFailure(f"scores() returned shape {tuple(value.shape)}, expected (n_query, n_removed) = "
                               f"({n_query}, {n_removed})")
    if not value.is_floating_point():
        raise EstimatorFailure(f"scores() returned dtype {str(value.dtype).replace('torch.', '')}, expected a floating "
                               "dtype (float64 recommended): scores are predicted changes of a loss")
    if not torch.isfinite(value).all():
        bad = int((~torch.isfinite(value)).sum())
        raise EstimatorFailure(f"scores() returned {bad} non-finite values (NaN or inf) of {value.numel()}")
    return value.detach().to("cpu", torch.float64)


def ground_truth_summary(gt: GroundTruth, response: str) -> dict:
    """How accurate the ground truth is, in a few numbers."""
    cert = gt.response(response)["certificate"]
    out = {"key": _response_key(gt.key, response), "response": response, "seconds": gt.seconds}
    if "relative_gradient_norm" in cert:
        rel = np.asarray(cert["relative_gradient_norm"])
        statuses = cert.get("status", [])
        out.update({
            "converged_fraction": float(np.mean(cert["converged"])),
            "median_relative_gradient_norm": float(np.median(rel)),
            "max_relative_gradient_norm": float(rel.max()),
            "tolerance": cert.get("tolerance"),
            "status_counts": status_counts(statuses),
            "untrusted": int(untrusted_rows(cert).sum()),
        })
    if "max_relative_residual" in cert:
        out.update({"method": cert["method"], "max_relative_residual": cert["max_relative_residual"]})
    if response == "pbrf" and SECOND_SOLVE in gt.responses:
        out["second_solve"] = second_solve_summary(gt.responses[SECOND_SOLVE])
    elif "second_run" in cert:  # pbrf-epochs: the same protocol with another batch order
        out["second_solve"] = cert["second_run"]
    return out


def second_solve_summary(check: dict) -> dict:
    """The ground truth's error bar from its second solve (ground_truth.compute_second_solve):
    median / max relative score error, the ceiling Pearson [95 % interval], and how the second
    solve ended."""
    return error_bar(check["summary"], check["removed"], check["certificate"]["method"], check["certificate"])


class Session:
    """Problems and ground truths of one benchmark run, built once per task and reused."""

    def __init__(self, settings: Settings):
        check_scale(settings.scale)
        self.settings = settings
        self.cache = Cache(settings.cache_dir)
        from tasks.data import default_data_root
        self.data_root = Path(settings.data_root) if settings.data_root else default_data_root()
        self._tasks: dict[str, tuple | BaseException] = {}
        self.rows: list[dict] = []
        #: (task, canonical spec) -> {"scores": (Q, R), "outputs": (R, n_eval, C) or None} of the
        #: rows scored in this session, reused by the decomposition (benchmark.decomposition)
        self.estimates: dict[tuple[str, str], dict] = {}
        self._baseline: dict | None = None

    def ground_truth_of(self, task_name: str) -> str:
        """The response function the rows of `task_name` are scored against: --ground-truth, or
        the task's own default at this scale (Task.ground_truth)."""
        return self.settings.ground_truth or get_task(task_name).ground_truth(self.settings.scale)

    def task_state(self, task_name: str) -> tuple[Problem, GroundTruth, bool]:
        """(problem, ground truth, ground truth was cached); a failure is remembered and re-raised.

        One task's problem and ground truth are held at a time (a worker runs a task's rows
        together): asking for another task drops the others', which come back from the cache if
        asked for again. Holding them all, one xdist worker of an all-16 cpu run grew to 14 GB
        by its fifth task and was killed by the OOM killer on a 23 GB machine."""
        if task_name not in self._tasks:
            held = [name for name, state in self._tasks.items() if not isinstance(state, BaseException)]
            for name in held:
                del self._tasks[name]
            if held:
                gc.collect()
            try:
                task = get_task(task_name)
                problem = build_problem(task, self.settings.scale, self.data_root, self.cache, self.settings.device)
                response = self.ground_truth_of(task_name)
                # the PBRF's minimiser (and its second solve) only where it is what is scored, or
                # where the response is computed on first use anyway (the retrainings)
                responses = RESPONSES if response in RESPONSES or response in retraining.RESPONSES else ("linear", response)
                gt, cached = load_ground_truth(task, self.settings.scale, problem, self.cache, responses)
                self._tasks[task_name] = (problem, gt, cached)
            except Exception as exc:  # remembered so that every row of this task fails the same way
                self._tasks[task_name] = exc
        state = self._tasks[task_name]
        if isinstance(state, BaseException):
            raise state
        return state

    def run(self, task_name: str, estimator_spec: str) -> dict:
        """Score one estimator on one task; returns the result (also written as JSON)."""
        s = self.settings
        estimator_spec = canonical_spec(estimator_spec, s.estimator_params.get(estimator_spec))
        try:
            response = self.ground_truth_of(task_name)
        except KeyError:  # an unknown task: its row fails below, naming it
            response = s.ground_truth or "pbrf"
        result = {
            "task": task_name, "estimator": estimator_spec, "scale": s.scale, "ground_truth": response,
            "status": "failed", "error": None,
            "pearson": None, "spearman": None, "pearson_pooled": None, "spearman_pooled": None,
            "pearson_ci": None, "spearman_ci": None,
            "output_distance": None, "output_distance_relative": None, "output_distance_std": None,
            "seconds": None, "seconds_fit": None, "seconds_scores": None, "peak_memory_mb": None,
            "evaluations": None, "evaluations_by_kind": None,
            "provenance": {
                "commit": git_commit(), "torch": torch.__version__, "numpy": np.__version__,
                "python": platform.python_version(), "platform": platform.platform(),
                "device": s.device, "device_name": _device_name(s.device), "threads": torch.get_num_threads(),
                "scale": s.scale, "seed": None, "ground_truth_key": None, "time_budget": s.time_budget,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            },
        }
        try:
            problem, gt, _ = self.task_state(task_name)
        except Exception as exc:
            result["error"] = f"task could not be prepared: {type(exc).__name__}: {exc}"
            return self._finish(result)
        result.update({"n_train": problem.n_train, "n_params": problem.n_params, "n_removed": len(gt.removed),
                       "n_query": len(problem.query), "damping": problem.damping,
                       "weight_decay": problem.weight_decay, "dtype": str(problem.dtype).replace("torch.", "")})
        result["provenance"].update(seed=problem.seed, ground_truth_key=_response_key(gt.key, response))
        try:
            truth_scores = gt.scores(response).numpy()
            result["ground_truth_certificate"] = ground_truth_summary(gt, response)
            trusted = len(gt.removed) - int(untrusted_rows(gt.response(response)["certificate"]).sum())
            # with too few trusted rows the estimator still runs (and is checked), unscored; torch's
            # global state is put back after it, whatever it did
            state = torch_state.capture()
            try:
                self._score(result, problem, gt, truth_scores, estimator_spec, scored=trusted >= MIN_TRUSTED_REMOVED)
            finally:
                changed = torch_state.restore(state)
                if changed:
                    result["global_state_changed"] = changed
            if trusted < MIN_TRUSTED_REMOVED:
                raise NoGroundTruth(
                    f"only {trusted} of {len(gt.removed)} removed examples have a trusted {response} solution "
                    f"(the others left the basin around θˢ or diverged), so no correlation can be measured at "
                    f"{s.scale} scale (the estimator ran and passed the output checks); the certificate in the "
                    f"result says more")
            if result.get("pearson") is None:
                raise UndefinedCorrelation(
                    f"the correlation is undefined for every query: the estimator's scores or the ground truth do "
                    f"not vary across the removed examples (constant; {result.get('pearson_undefined')} of "
                    f"{result.get('n_query_scored')} queries)")
            result["status"] = "ok"
        except UndefinedCorrelation as exc:
            result["status"], result["error"] = "undefined", str(exc)
        except NoGroundTruth as exc:
            result["status"], result["error"] = "no_ground_truth", str(exc)
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
            result["traceback"] = traceback.format_exc(limit=-4)
        finally:
            problem.counter.reset()
        if s.baseline is not None:
            result["guard"] = guard.verdict(result, self.baseline(), str(s.baseline))
        return self._finish(result)

    def estimate(self, task_name: str, estimator_spec: str) -> dict:
        """{"scores": (Q, R) float64, "outputs": f(θˢ + Δₘ, x_eval) (R, n_eval, C) for parameter
        estimators, else None} of one estimator on one task: those of its row if this session
        scored it, else the row is run now (with all of run()'s checks). Raises EstimatorFailure
        with the row's error when the row failed."""
        spec = canonical_spec(estimator_spec, self.settings.estimator_params.get(estimator_spec))
        if (task_name, spec) not in self.estimates:
            result = self.run(task_name, spec)
            if (task_name, spec) not in self.estimates:
                raise EstimatorFailure(f"{task_name} / {spec}: {result['status']}: {result['error']}")
        return self.estimates[(task_name, spec)]

    def baseline(self) -> dict:
        """The accuracy guard's baseline (read once per session)."""
        if self._baseline is None:
            self._baseline = guard.load(self.settings.baseline)
        return self._baseline

    def _score(self, result: dict, problem: Problem, gt: GroundTruth, truth: np.ndarray, spec: str,
               scored: bool = True) -> None:
        """Fit and score the estimator with every check; unless `scored` is False (too few trusted
        ground-truth rows), its correlations and output distance go into `result`."""
        s = self.settings
        result["estimator_overrides"] = _plain(parse_spec(spec)[1])
        estimator = make_estimator(spec)
        result["estimator_params"] = {k: repr(v) if not isinstance(v, (int, float, str, bool, type(None))) else v
                                      for k, v in estimator.get_params().items()} if hasattr(
            estimator, "get_params") else {}
        result["provenance"]["estimator_seed"] = result["estimator_params"].get("seed")
        removed = gt.removed.to(problem.device)
        if getattr(estimator, "uses_checkpoints", False):
            problem.checkpoints()  # harness work (cached), outside the row's clock
        snapshot = _snapshot(problem)
        problem.counter.reset()
        budget = s.time_budget
        # Under a time budget every operator of the problem raises TimeBudgetExceeded once the
        # deadline has passed (an ordinary exception at a call boundary: the process stays sound);
        # an estimator that overruns without calling an operator is caught after the fact below.
        started = time.monotonic()
        problem.counter.deadline = None if budget is None else started + budget
        try:
            with machine_load() as load:
                with measure(s.device) as fit_m:
                    fitted = estimator.fit(problem)
                if fitted is not estimator:
                    raise EstimatorFailure("fit() must return self")
                delta = None
                with measure(s.device) as score_m:
                    if isinstance(estimator, ParameterEstimator) and \
                            type(estimator).scores is ParameterEstimator.scores:
                        delta = estimator.parameter_change(removed)
                        raw = estimator.scores_from_change(delta, problem.query)
                    else:
                        raw = estimator.scores(removed, problem.query)
            problem.counter.deadline = None
            if budget is not None and fit_m.seconds + score_m.seconds > budget:
                raise EstimatorFailure(f"time budget exceeded: fit + scores took {fit_m.seconds + score_m.seconds:.1f} s, "
                                       f"more than --time-budget {budget:g} s")
            scores = _as_scores(raw, len(problem.query), len(removed))
            evaluations = problem.counter.as_dict()  # fit + scores only, not the extra call below
            if isinstance(estimator, ParameterEstimator) and delta is None:
                delta = estimator.parameter_change(removed)
        except TimeBudgetExceeded:
            _restore_if_changed(problem, snapshot)
            raise EstimatorFailure(f"time budget exceeded: interrupted after {time.monotonic() - started:.1f} s of "
                                   f"fit + scores, more than --time-budget {budget:g} s") from None
        except EstimatorFailure:
            _restore_if_changed(problem, snapshot)
            raise
        except Exception as exc:
            _restore_if_changed(problem, snapshot)
            raise EstimatorFailure(f"the estimator raised {type(exc).__name__}: {exc}") from exc
        finally:
            problem.counter.deadline = None
        _check_unchanged(problem, snapshot)
        bad = untrusted_rows(gt.response(self.ground_truth_of(problem.task))["certificate"])
        keep = ~bad if bad.size else np.ones(truth.shape[1], dtype=bool)
        if scored:
            result.update(correlations(scores.numpy()[:, keep], truth[:, keep], seed=problem.seed))
            result["n_removed_scored"] = int(keep.sum())
        # the score matrices themselves, for scatter plots and re-analysis (Q × R, 10 digits)
        result.update({"removed": gt.removed.tolist(), "scores": _rounded(scores.numpy()),
                       "truth_scores": _rounded(truth)})
        result.update({
            "seconds_fit": fit_m.seconds, "seconds_scores": score_m.seconds,
            "seconds": fit_m.seconds + score_m.seconds,
            "peak_memory_mb": max(fit_m.peak_memory_mb, score_m.peak_memory_mb),
            "evaluations": evaluations["total"], "evaluations_by_kind": evaluations, "load": load,
            "solver": getattr(estimator, "solver_", None),
        })
        outputs = self._output_distance(result, problem, gt, delta, scored) if delta is not None else None
        self.estimates[(result["task"], spec)] = {"scores": scores.numpy(), "outputs": outputs}

    def _output_distance(self, result: dict, problem: Problem, gt: GroundTruth, delta: torch.Tensor,
                         scored: bool = True) -> np.ndarray | None:
        """Output distance to the row's ground truth (the PBRF, or the task's own) on the evaluation
        inputs; returns f(θˢ + Δₘ, x_eval) (R, n_eval, C), or None where a finite Δ made them
        overflow (then the row has no output distance, and says for how many removed examples)."""
        if tuple(delta.shape) != (len(gt.removed), problem.n_params) or not torch.isfinite(delta).all():
            raise EstimatorFailure(f"parameter_change() returned shape {tuple(delta.shape)} or non-finite values; "
                                   f"expected finite (n_removed, d) = ({len(gt.removed)}, {problem.n_params})")
        eval_inputs = problem.train.inputs[gt.eval_idx.to(problem.device)]
        with torch.no_grad():
            outputs = torch.stack([problem.model(problem.params + d, eval_inputs) for d in delta]).cpu().numpy()
        overflow = ~np.isfinite(outputs.reshape(len(outputs), -1)).all(axis=1)
        if overflow.any():
            result["output_overflow"] = int(overflow.sum())
            log.warning("%s / %s: the predicted parameter change makes the model's outputs non-finite for %d of %d "
                        "removed examples: no output distance", result["task"], result["estimator"],
                        overflow.sum(), len(overflow))
            return None
        truth = gt.response(self.ground_truth_of(result["task"]))
        keep = ~untrusted_rows(truth["certificate"])
        keep = keep if keep.size else np.ones(len(gt.removed), dtype=bool)
        if not scored or not keep.any():
            return outputs
        target = truth["outputs"].numpy()[keep]
        dist = output_distance(outputs[keep], target)
        effect = output_distance(gt.base_outputs.numpy()[None], target)
        result.update({"output_distance": float(dist.mean()), "output_distance_std": float(dist.std()),
                       "output_distance_relative": float(dist.mean() / max(effect.mean(), 1e-300))})
        return outputs

    def _finish(self, result: dict) -> dict:
        self.rows.append(result)
        if self.settings.results_dir is not None:
            write_result(result, Path(self.settings.results_dir))
        return result


def _device_name(device: str) -> str:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _response_key(key: str, response: str) -> str:
    """The cache key of one response function from GroundTruth.key ("pbrf:…,linear:…" or one key)."""
    parts = dict(p.split(":", 1) for p in str(key).split(",") if ":" in p)
    return parts.get(response, str(key))


def _plain(params: dict) -> dict:
    return {k: v if isinstance(v, (int, float, str, bool, type(None))) else repr(v) for k, v in params.items()}


def _rounded(matrix: np.ndarray) -> list[list[float]]:
    return [[float(f"{v:.10g}") for v in row] for row in np.asarray(matrix, dtype=np.float64)]


def result_path(result: dict, results_dir: Path) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", result["estimator"]).strip("_")
    return results_dir / result["scale"] / f"{result['task']}__{safe}__{result['ground_truth']}.json"


def _dumps(result: dict) -> str:
    """Indented JSON, with the score matrices one row per line (not one number per line)."""
    matrices = {k: result[k] for k in ("removed", "scores", "truth_scores") if isinstance(result.get(k), list)}
    text = json.dumps({**result, **{k: f"@@{k}@@" for k in matrices}}, indent=2, sort_keys=False, default=str)
    for k, value in matrices.items():
        if value and isinstance(value[0], list):
            dumped = "[\n    " + ",\n    ".join(json.dumps(row) for row in value) + "\n  ]"
        else:
            dumped = json.dumps(value)
        text = text.replace(f'"@@{k}@@"', dumped, 1)
    return text


def write_result(result: dict, results_dir: Path) -> Path:
    return atomic_write_text(_dumps(result) + "\n", result_path(result, results_dir))


__all__ = ["Session", "Settings", "EstimatorFailure", "write_result", "result_path"]
