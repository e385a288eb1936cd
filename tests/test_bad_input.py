"""Bad input gives a clear error or a failed row, and the rest goes on.

The Session tests run the real harness on task "lr-cancer" at smoke scale (data bundled with
scikit-learn; training and ground truth take a few seconds once, then come from a cache that all
tests of this module share). The misbehaving estimators live in tests/bad_estimators.py and are
loaded with `path/to/file.py:Class` specs, so the file-spec loader is exercised too.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import estimators
from benchmark.cache import Cache, CacheWarning
from benchmark.problem import Batch
from benchmark.runner import REPO, Session, Settings, result_path
from estimators import REGISTRY, NotFittedError, ParameterEstimator, UnknownEstimator, make_estimator
from tasks import get_task

BAD_FILE = Path(__file__).resolve().parent / "bad_estimators.py"


def spec(name: str) -> str:
    """`tests/bad_estimators.py:Name` (relative to the working directory when run from the repo)."""
    return f"{os.path.relpath(BAD_FILE)}:{name}"


# ---------------------------------------------------------------- names


def test_unknown_task_suggests():
    with pytest.raises(KeyError) as info:
        get_task("mlp-mnst")
    message = str(info.value.args[0])
    assert "unknown task 'mlp-mnst'" in message
    assert "Did you mean 'mlp-mnist'" in message
    assert "lr-cancer" in message  # lists the known tasks


def test_unknown_estimator_suggests():
    with pytest.raises(UnknownEstimator) as info:
        make_estimator("lisa")
    message = str(info.value)
    assert "unknown estimator 'lisa'" in message
    assert "'lissa'" in message
    assert isinstance(info.value, KeyError)


def test_missing_estimator_file():
    with pytest.raises(UnknownEstimator, match=r"path/to/file\.py does not exist"):
        make_estimator("path/to/file.py:Class")


def test_missing_class_in_file():
    with pytest.raises(UnknownEstimator, match="has no class 'Nope'"):
        make_estimator(spec("Nope"))


def test_missing_module():
    with pytest.raises(UnknownEstimator, match="cannot import module 'no_such_package.mod'"):
        make_estimator("no_such_package.mod:Class")


def test_not_an_estimator():
    with pytest.raises(TypeError, match="estimator contract"):
        make_estimator(spec("NotAnEstimator"))


def test_file_spec_loads_a_working_estimator():
    est = make_estimator(spec("GoodGradDot"))
    assert type(est).__name__ == "GoodGradDot"
    assert isinstance(est, estimators.GradDot)


def _run_benchmark_cli(tmp_path, *args, scale: str = "smoke") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "benchmark/", "--scale", scale, *args, "-q", "-p", "no:cacheprovider",
         "--cache-dir", str(tmp_path / "cache"), "--results-dir", str(tmp_path / "results")],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def test_cli_unknown_task_is_usage_error(tmp_path):
    proc = _run_benchmark_cli(tmp_path, "--task", "mlp-mnst")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert proc.returncode == 4, out  # pytest's usage-error exit status
    assert "unknown task 'mlp-mnst'" in out and "mlp-mnist" in out, out
    assert not (tmp_path / "results").exists()  # nothing ran


def test_default_tasks_per_scale(tmp_path, monkeypatch):
    """Without --task, each scale runs the tasks meant for it (Task.default_scales): every task at
    every scale today, all 16 collected at cpu; a task that leaves a scale out runs there only
    when named."""
    import tasks
    from tasks import TASKS, default_tasks
    for scale in ("smoke", "cpu", "paper"):
        assert default_tasks(scale) == list(TASKS)
    assert len(TASKS) == 16
    proc = _run_benchmark_cli(tmp_path, "--collect-only", "-v", "--estimator", "exact", scale="cpu")  # -v: header
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # the 16 rows, and the decomposition tests deselected (off by default at cpu scale)
    assert "16/32 tests collected (16 deselected)" in out, out
    assert "test_estimator[vgg13-mnist/exact]" in out and "test_estimator[resnet20-cifar/exact]" in out, out
    assert "not run by default" not in out, out

    slow = type("SlowTask", (TASKS["vgg13-mnist"],), {"default_scales": ("smoke", "paper")})
    monkeypatch.setitem(tasks.TASKS, "vgg13-mnist", slow)
    assert "vgg13-mnist" not in default_tasks("cpu") and "vgg13-mnist" in default_tasks("smoke")
    assert len(default_tasks("cpu")) == 15


def test_cli_unknown_estimator_is_usage_error(tmp_path):
    proc = _run_benchmark_cli(tmp_path, "--task", "lr-cancer", "--estimator", "lisa")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 4, out
    assert "unknown estimator 'lisa'" in out and "'lissa'" in out, out


# ---------------------------------------------------------------- not fitted


@pytest.mark.parametrize("name", list(REGISTRY))
def test_scores_before_fit(name):
    est = make_estimator(name)
    batch = Batch(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    with pytest.raises(NotFittedError, match=r"call fit\(problem\) before scores"):
        est.scores(torch.tensor([0, 1]), batch)
    if isinstance(est, ParameterEstimator):
        with pytest.raises(NotFittedError, match="call fit"):
            est.parameter_change(torch.tensor([0]))


# ---------------------------------------------------------------- failed rows


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A cache and data root shared by every Session of this module (ground truth computed once)."""
    root = tmp_path_factory.mktemp("bench")
    (root / "data").mkdir()
    return root


def make_session(root: Path, results: Path, data_root: Path | None = None) -> Session:
    return Session(Settings(scale="smoke", cache_dir=root / "cache", data_root=data_root or root / "data",
                            results_dir=results))


@pytest.fixture
def session(shared, tmp_path):
    return make_session(shared, tmp_path / "results")


def test_good_rows(session, tmp_path):
    for name in ("exact", spec("GoodGradDot")):
        result = session.run("lr-cancer", name)
        assert result["status"] == "ok", result["error"]
        assert result["error"] is None
        assert -1 <= result["pearson"] <= 1
        path = result_path(result, tmp_path / "results")
        assert json.loads(path.read_text())["status"] == "ok"


BAD = {
    "RaisesInFit": r"the estimator raised ValueError: boom",
    "NaNScores": r"scores\(\) returned 1 non-finite values",
    "WrongShape": r"scores\(\) returned shape \(\d+, \d+\), expected \(n_query, n_removed\)",
    "ModifiesParams": r"modified the problem's params",
    "FitReturnsNone": r"fit\(\) must return self",
    "ModifiesThenRaises": r"the estimator raised RuntimeError: failed after scribbling",
    "IntegerScores": r"scores\(\) returned dtype int64, expected a floating dtype",
}


def test_outputs_that_overflow_give_no_output_distance(session, tmp_path):
    """A finite Δ that makes f(θˢ + Δ, x) overflow: the row keeps its (finite) correlations, has
    no output distance (not NaN), says for how many removed examples, and writes valid JSON."""
    result = session.run("lr-cancer", spec("OverflowingChange"))
    assert result["status"] == "ok", result["error"]
    assert result["pearson"] is not None
    assert result["output_distance"] is None and result["output_distance_relative"] is None
    assert result["output_overflow"] == result["n_removed"]
    written = json.loads(result_path(result, tmp_path / "results").read_text(), parse_constant=pytest.fail)
    assert written["output_distance"] is None and written["output_overflow"] == result["n_removed"]
    assert session.estimates[("lr-cancer", result["estimator"])]["outputs"] is None


@pytest.mark.parametrize("name", list(BAD))
def test_bad_estimator_fails_row_and_rest_goes_on(session, tmp_path, name):
    before = session.run("lr-cancer", "grad-dot")
    assert before["status"] == "ok", before["error"]
    result = session.run("lr-cancer", spec(name))
    assert result["status"] == "failed"
    assert re.search(BAD[name], result["error"]), result["error"]
    assert result["pearson"] is None
    written = json.loads(result_path(result, tmp_path / "results").read_text())
    assert written["status"] == "failed" and written["error"] == result["error"]
    after = session.run("lr-cancer", "grad-dot")
    assert after["status"] == "ok", after["error"]
    # ... and the next row measures the same thing as before the bad one
    assert after["pearson"] == pytest.approx(before["pearson"], abs=1e-12)
    assert after["spearman"] == pytest.approx(before["spearman"], abs=1e-12)


def _numbers(result: dict) -> dict:
    return {k: result[k] for k in ("pearson", "spearman", "pearson_pooled", "pearson_ci", "scores", "truth_scores")}


def test_constant_scores_are_undefined_not_zero(session):
    """Constant scores correlate with nothing: the row says undefined, has no main number (so it is
    never bold and never enters the baseline), and the next row is unaffected."""
    before = session.run("lr-cancer", "grad-dot")
    result = session.run("lr-cancer", spec("ConstantScores"))
    assert result["status"] == "undefined" and result["pearson"] is None and result["pearson_ci"] is None
    assert result["pearson_undefined"] == result["n_query_scored"] > 0
    assert "undefined for every query" in result["error"]
    from benchmark import guard
    assert guard.verdict(result, guard.empty())["status"] == "not applicable"
    assert _numbers(session.run("lr-cancer", "grad-dot")) == _numbers(before)


def test_global_state_is_restored_after_a_row_and_the_row_says_so(session):
    """A row that changes torch's global state in fit: put back, named in that row, and the next
    row's numbers are bitwise those of a row run without it."""
    before_state = (torch.get_default_dtype(), torch.get_num_threads(), torch.random.get_rng_state(),
                    torch.is_grad_enabled(), torch.are_deterministic_algorithms_enabled())
    reference = session.run("lr-cancer", "lissa")
    result = session.run("lr-cancer", spec("ChangesGlobalState"))
    assert result["status"] == "ok", result["error"]
    assert set(result["global_state_changed"]) >= {"default dtype", "threads", "torch RNG state", "grad mode",
                                                   "deterministic algorithms"}
    after_state = (torch.get_default_dtype(), torch.get_num_threads(), torch.random.get_rng_state(),
                   torch.is_grad_enabled(), torch.are_deterministic_algorithms_enabled())
    assert after_state[:2] == before_state[:2] and torch.equal(after_state[2], before_state[2])
    assert after_state[3:] == before_state[3:]
    assert "global_state_changed" not in (after := session.run("lr-cancer", "lissa"))
    assert _numbers(after) == _numbers(reference)


def test_each_row_records_the_load_it_ran_under(session):
    load = session.run("lr-cancer", "exact")["load"]
    assert load["threads"] == torch.get_num_threads() and load["cpus"] >= 1
    assert isinstance(load["contended"], bool) and load["cpu_seconds_per_second"] >= 0


@pytest.mark.parametrize("name", ["ModifiesParams", "ModifiesThenRaises"])
def test_problem_is_intact_after_a_row_that_modified_it(session, name):
    problem, _, _ = session.task_state("lr-cancer")
    theta = problem.params.clone()
    result = session.run("lr-cancer", spec(name))
    assert result["status"] == "failed"
    assert torch.equal(session.task_state("lr-cancer")[0].params, theta), \
        "θˢ stays modified for every later row of the session"


def test_session_holds_one_task_at_a_time(session):
    """Moving to another task drops the previous task's problem and ground truth (an all-16 run
    kept them all in one worker until the OOM killer stopped it); asking again reloads it from
    the cache, with the same numbers."""
    import weakref
    first = session.run("lr-cancer", "exact")
    problem, _, _ = session.task_state("lr-cancer")
    dropped = weakref.ref(problem)
    del problem
    other = session.run("lr-diabetes", "exact")
    assert first["status"] == other["status"] == "ok"
    assert dropped() is None and list(session._tasks) == ["lr-diabetes"]
    again = session.run("lr-cancer", "exact")
    assert again["pearson"] == first["pearson"] and again["truth_scores"] == first["truth_scores"]
    assert session.task_state("lr-cancer")[2]  # reloaded from the cache, not recomputed


def test_unknown_names_in_session_are_failed_rows(session):
    task = session.run("mlp-mnst", "exact")
    assert task["status"] == "failed" and "Did you mean 'mlp-mnist'" in task["error"]
    est = session.run("lr-cancer", "lisa")
    assert est["status"] == "failed" and "'lissa'" in est["error"]
    ok = session.run("lr-cancer", "grad-dot")
    assert ok["status"] == "ok", ok["error"]


def test_missing_dataset_is_failed_row(shared, tmp_path):
    empty = tmp_path / "empty-data"
    empty.mkdir()
    session = make_session(shared, tmp_path / "results", data_root=empty)
    result = session.run("mlp-energy", "exact")
    assert result["status"] == "failed"
    error = result["error"]
    assert "task could not be prepared" in error
    assert str(empty / "uci" / "energy.txt") in error  # which file
    assert "python -m tasks.stage_data" in error and "download=True" in error  # how to get it
    # every row of that task fails the same way; other tasks go on
    assert session.run("mlp-energy", "grad-dot")["error"] == error
    assert session.run("lr-cancer", "grad-dot")["status"] == "ok"


# ---------------------------------------------------------------- cache


class Counting:
    def __init__(self, value=None):
        self.calls = 0
        self.value = torch.arange(5.0) if value is None else value

    def __call__(self):
        self.calls += 1
        return {"x": self.value.clone(), "n": self.calls}


FP = {"task": "t", "version": 1, "settings": {"a": 1.5, "b": [1, 2]}}


def no_warnings_call(cache, compute, fp=FP):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return cache.get_or_compute("kind", "name", fp, compute)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def test_cache_roundtrip(tmp_path):
    cache, compute = Cache(tmp_path), Counting()
    value, cached = no_warnings_call(cache, compute)
    assert not cached and compute.calls == 1
    value2, cached2 = no_warnings_call(cache, compute)
    assert cached2 and compute.calls == 1
    assert torch.equal(value2["x"], value["x"]) and value2["n"] == 1
    # another fingerprint is another entry
    _, cached3 = no_warnings_call(cache, compute, {**FP, "version": 2})
    assert not cached3 and compute.calls == 2


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_damaged_cache_entry_is_recomputed(tmp_path, damage):
    cache, compute = Cache(tmp_path), Counting()
    no_warnings_call(cache, compute)
    path = cache.path("kind", "name", FP)
    raw = path.read_bytes()
    path.write_bytes({"garbage": b"\x00not a torch file\xff" * 10, "truncated": raw[:len(raw) // 2],
                      "empty": b""}[damage])
    with pytest.warns(CacheWarning, match="damaged or stale"):
        value, cached = cache.get_or_compute("kind", "name", FP, compute)
    assert not cached and compute.calls == 2 and value["n"] == 2
    # the file is valid again
    value, cached = no_warnings_call(cache, compute)
    assert cached and compute.calls == 2 and value["n"] == 2
    assert leftovers(path.parent) == [path.name]


def test_foreign_fingerprint_is_not_trusted(tmp_path):
    cache, compute = Cache(tmp_path), Counting()
    path = cache.path("kind", "name", FP)
    path.parent.mkdir(parents=True)
    torch.save({"fingerprint": {**FP, "version": 99}, "value": {"x": torch.zeros(1), "n": -1}}, path)
    with pytest.warns(CacheWarning, match="fingerprint does not match"):
        value, cached = cache.get_or_compute("kind", "name", FP, compute)
    assert not cached and value["n"] == 1
    assert no_warnings_call(cache, compute)[1]
    # a file that is a valid torch file but not an entry at all
    torch.save([1, 2, 3], path)
    with pytest.warns(CacheWarning):
        value, cached = cache.get_or_compute("kind", "name", FP, compute)
    assert not cached and value["n"] == 2


@pytest.mark.parametrize("umask, mode", [(0o002, 0o664), (0o022, 0o644), (0o077, 0o600)])
def test_cache_files_get_the_umask_mode(tmp_path, umask, mode):
    """Not mkstemp's 0600: a cache directory shared by a group stays readable by the group."""
    old = os.umask(umask)
    try:
        no_warnings_call(Cache(tmp_path), Counting())
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert files and all(p.stat().st_mode & 0o777 == mode for p in files), \
        [(p.name, oct(p.stat().st_mode & 0o777)) for p in files]


def test_interrupted_compute_leaves_nothing(tmp_path):
    cache = Cache(tmp_path)

    def fails():
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-computation

    with pytest.raises(KeyboardInterrupt):
        cache.get_or_compute("kind", "name", FP, fails)
    path = cache.path("kind", "name", FP)
    assert not path.exists()
    assert leftovers(path.parent) == []
    value, cached = no_warnings_call(cache, Counting())
    assert not cached and value["n"] == 1


def test_interrupted_write_leaves_no_temp_file(tmp_path):
    cache = Cache(tmp_path)
    path = cache.path("kind", "name", FP)
    with pytest.raises(Exception):
        cache.get_or_compute("kind", "name", FP, lambda: {"f": lambda: 1})  # torch.save cannot pickle it
    assert not path.exists()
    assert leftovers(path.parent) == []


def test_row_without_trusted_ground_truth_still_checks_the_estimator(shared, tmp_path):
    """Too few removed examples with a local PBRF solution: no correlation is measured, but the
    estimator still runs with every check (a broken one still fails its row)."""
    session = make_session(shared, tmp_path / "results")
    _, gt, _ = session.task_state("lr-cancer")
    cert = dict(gt.response("pbrf")["certificate"])
    cert["status"] = ["left_basin"] * (len(gt.removed) - 2) + cert["status"][-2:]
    gt.responses["pbrf"] = {**gt.responses["pbrf"], "certificate": cert}
    ok = session.run("lr-cancer", "exact")
    assert ok["status"] == "no_ground_truth" and "only 2 of" in ok["error"], ok["error"]
    assert ok["pearson"] is None and ok["output_distance"] is None
    assert ok["seconds"] is not None and ok["evaluations"] > 0
    bad = session.run("lr-cancer", spec("NaNScores"))
    assert bad["status"] == "failed" and "non-finite" in bad["error"], bad["error"]
    from benchmark.decomposition import decompose
    from benchmark.runner import NoGroundTruth
    with pytest.raises(NoGroundTruth, match="only 2 of"):
        decompose(session, "lr-cancer", ["exact"])


def test_a_collapsed_base_model_is_refused():
    """θˢ with the same outputs for every input (a net that never left the class prior) is
    refused with a message naming the fix; a trained one passes."""
    import torch.nn.functional as F
    from torch import nn

    from benchmark.ground_truth import check_base_model
    from benchmark.problem import FunctionalModel, Problem

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, generator=g, dtype=torch.float64), torch.randint(2, (40,), generator=g)
    module = nn.Linear(3, 2).double()
    model = FunctionalModel(module)

    def problem(theta):
        return Problem(task="tiny", scale="smoke", model=model, params=theta, train=Batch(x, y), query=Batch(x, y),
                       loss=lambda o, t: F.cross_entropy(o, t, reduction="none"), damping=1e-3,
                       weight_decay=0.0, seed=0)

    trained = model.flatten()
    check_base_model(problem(trained))
    collapsed = trained.clone()
    collapsed[:6] = 0.0  # weights 0, biases left: the same logits for every input
    with pytest.raises(ValueError, match="gives the same outputs for every training input.*fix the task's recipe"):
        check_base_model(problem(collapsed))
