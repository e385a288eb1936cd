"""Estimator specs (`name(key=value)`, --estimator-param, files outside the repository), the
provenance of a result, and --time-budget."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from benchmark.runner import Session, Settings
from estimators import (EstimatorSpecError, UnknownEstimator, canonical_spec, format_spec, make_estimator,
                        parse_param, parse_spec)

REPO = Path(__file__).resolve().parent.parent
DEGRADED = REPO / "tests" / "degraded.py"


# ---------------------------------------------------------------- parsing


def test_parse_and_format():
    assert parse_spec("exact") == ("exact", {})
    assert parse_spec("lissa(depth=200, batch_size=64)") == ("lissa", {"depth": 200, "batch_size": 64})
    assert parse_spec("pkg.mod:Cls(alpha=-1e-3, name='a:b', sizes=(1, 2))") == (
        "pkg.mod:Cls", {"alpha": -1e-3, "name": "a:b", "sizes": (1, 2)})
    assert parse_spec("/tmp/my (copy)/est.py:Mine(k=None)") == ("/tmp/my (copy)/est.py:Mine", {"k": None})
    assert format_spec("lissa", {"depth": 200, "batch_size": 64}) == "lissa(batch_size=64,depth=200)"
    assert canonical_spec("lissa(depth=1)", {"depth": 200, "seed": 3}) == "lissa(depth=200,seed=3)"
    assert canonical_spec("lissa( depth = 200 )") == canonical_spec("lissa", {"depth": 200})


def test_parse_param():
    assert parse_param("depth=200") == ("depth", 200)
    assert parse_param("damping=1e-2") == ("damping", 0.01)
    assert parse_param("solver=dense") == ("solver", "dense")
    assert parse_param("sizes=(16, 16)") == ("sizes", (16, 16))
    with pytest.raises(EstimatorSpecError):
        parse_param("depth")


@pytest.mark.parametrize("spec, message", [
    ("lissa(200)", "as keywords"),
    ("lissa(depth=x)", "not a Python literal"),
    ("lissa(dpth=3)", "takes no parameter 'dpth'"),
    ("lissa(depth=", "unbalanced parentheses"),
    ("lissa(depth=))", "cannot parse"),
])
def test_bad_specs(spec, message):
    with pytest.raises(EstimatorSpecError, match=message):
        make_estimator(spec)


def test_arguments_reach_the_constructor():
    est = make_estimator("lissa(depth=7)", batch_size=16)
    assert (est.depth, est.batch_size) == (7, 16)
    assert make_estimator("exact-damp1e-2(rtol=1e-8)").get_params()["damping"] == 1e-2
    est = make_estimator(f"{DEGRADED}:ScaledGradDot(alpha=2.5)")
    assert est.alpha == 2.5
    with pytest.raises(UnknownEstimator):
        make_estimator(f"{DEGRADED}:Nope")


# ---------------------------------------------------------------- through pytest


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("spec-cache")


def test_file_outside_the_repo_with_params(cache_dir, tmp_path):
    """An author's file, a relative path from their own working directory, and --estimator-param."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "mine.py").write_text(textwrap.dedent("""
        from estimators import GradDot

        class Mine(GradDot):
            def __init__(self, alpha=1.0, tag="x"):
                self.alpha, self.tag = alpha, tag

            def scores(self, train_idx, query):
                return self.alpha * super().scores(train_idx, query)
    """))
    cmd = [sys.executable, "-m", "pytest", str(REPO / "benchmark"), "--scale", "smoke", "--task", "lr-cancer",
           "--estimator", "mine.py:Mine", "--estimator", "mine.py:Mine(tag='y')", "--estimator-param", "alpha=-2",
           "--cache-dir", str(cache_dir), "--results-dir", str(tmp_path / "results"), "--baseline", "none",
           "-p", "no:cacheprovider", "-q"]
    out = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "mine.py:Mine(alpha=-2)" in out.stdout and "mine.py:Mine(alpha=-2,tag='y')" in out.stdout
    result = json.loads((tmp_path / "results" / "smoke" / "lr-cancer__mine.py_Mine_alpha_-2__pbrf.json").read_text())
    assert result["estimator"] == "mine.py:Mine(alpha=-2)"
    assert result["estimator_overrides"] == {"alpha": -2}
    assert result["estimator_params"] == {"alpha": -2, "tag": "x"}
    assert result["pearson"] < 0  # alpha = −2 flips the sign: the parameter did reach the constructor


def test_unknown_parameter_is_a_usage_error(cache_dir, tmp_path):
    cmd = [sys.executable, "-m", "pytest", "benchmark/", "--scale", "smoke", "--task", "lr-cancer",
           "--estimator", "exact", "--estimator-param", "depth=3", "--cache-dir", str(cache_dir),
           "--results-dir", str(tmp_path), "-p", "no:cacheprovider", "-q"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 4, out.stdout + out.stderr
    assert "takes no parameter 'depth'" in out.stderr


# ---------------------------------------------------------------- in process: provenance, time budget


@pytest.fixture(scope="module")
def session(cache_dir, tmp_path_factory):
    return Session(Settings(scale="smoke", cache_dir=cache_dir, results_dir=tmp_path_factory.mktemp("res")))


def test_provenance_is_complete(session):
    r = session.run("lr-cancer", "grad-dot")
    assert r["status"] == "ok"
    prov = r["provenance"]
    for key in ("commit", "torch", "device", "device_name", "scale", "seed", "ground_truth_key", "date", "threads"):
        assert prov.get(key) not in (None, ""), key
    assert prov["seed"] == 0 and prov["scale"] == "smoke"
    assert prov["ground_truth_key"] in r["ground_truth_certificate"]["key"]
    assert "converged_fraction" in r["ground_truth_certificate"]
    Q, R = r["n_query"], r["n_removed"]
    assert len(r["scores"]) == Q and len(r["scores"][0]) == R and len(r["truth_scores"]) == Q
    assert len(r["removed"]) == R


def test_each_task_is_scored_against_its_own_ground_truth(session, cache_dir):
    """Without --ground-truth a row is scored against its task's default (the batch-norm nets:
    pbrf-epochs, every other task: pbrf) and says so; --ground-truth overrides it everywhere."""
    assert session.ground_truth_of("lr-cancer") == "pbrf"
    assert session.ground_truth_of("lenet-mnist") == "pbrf"
    for bn in ("vgg13-mnist", "resnet20-cifar"):
        assert session.ground_truth_of(bn) == "pbrf-epochs"
    # AlexNet-CIFAR: pbrf-epochs at cpu only (a PBRF saddle there), pbrf at the other scales
    from tasks import get_task
    alexnet = get_task("alexnet-cifar")
    assert session.ground_truth_of("alexnet-cifar") == "pbrf" == alexnet.ground_truth("paper")
    assert alexnet.ground_truth("cpu") == "pbrf-epochs" and get_task("lenet-cifar").ground_truth("cpu") == "pbrf"
    forced = Session(Settings(scale="smoke", cache_dir=cache_dir, ground_truth="warm"))
    assert forced.ground_truth_of("vgg13-mnist") == "warm"
    r = session.run("lr-cancer", "grad-dot")
    assert r["ground_truth"] == "pbrf" and r["ground_truth_certificate"]["response"] == "pbrf"


def test_time_budget(session, cache_dir):
    reference = session.run("lr-cancer", "exact")
    budgeted = Session(Settings(scale="smoke", cache_dir=cache_dir, time_budget=0.5))
    # interrupted at the next operator call, well before it would end (never)
    r = budgeted.run("lr-cancer", f"{DEGRADED}:EndlessOperators")
    assert r["status"] == "failed" and "time budget exceeded: interrupted after" in r["error"], r["error"]
    # no operator calls: measured after the fact
    r = budgeted.run("lr-cancer", f"{DEGRADED}:Sleepy(seconds=0.8)")
    assert r["status"] == "failed" and "took" in r["error"] and "more than --time-budget 0.5 s" in r["error"]
    # the process and the problem are sound afterwards: the next row gives the same numbers
    problem, _, _ = budgeted.task_state("lr-cancer")
    assert problem.counter.deadline is None
    assert torch._C._functorch.peek_interpreter_stack() is None and torch.is_grad_enabled()
    r = budgeted.run("lr-cancer", "exact")
    assert r["status"] == "ok" and r["pearson"] == reference["pearson"] and r["scores"] == reference["scores"]
    assert r["provenance"]["time_budget"] == 0.5
