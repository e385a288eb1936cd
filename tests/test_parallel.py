"""Parallel runs: the cache computes an entry once however many processes ask for it, and
`pytest benchmark/ -n 2` (pytest-xdist) gives the numbers of a serial run, with the summary
table in the controller's output."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

WORKER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from benchmark.cache import Cache

    root, log = Path(sys.argv[1]), Path(sys.argv[2])
    Path(sys.argv[3]).touch()                       # say "ready"
    while not Path(sys.argv[4]).exists():           # wait for "go", so that both ask at once
        time.sleep(0.005)

    def compute():
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\\n")
        time.sleep(1.0)                             # long enough for the other process to arrive
        return {"value": 42}

    value, cached = Cache(root).get_or_compute("ground_truth", "task-smoke-pbrf", {"key": 1}, compute)
    print(f"{value['value']} {cached}")
""")


def test_two_processes_compute_an_entry_once(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    log, go = tmp_path / "computed.log", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache"), str(log),
                               str(tmp_path / f"ready{i}"), str(go)], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(f"a worker exited before it was ready: {proc.communicate()}")
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.01)
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len(log.read_text().split()) == 1, "the entry was computed more than once"
    results = sorted(out.strip() for out, _ in outs)
    assert results == ["42 False", "42 True"]


NUMBERS = ("pearson", "spearman", "pearson_pooled", "spearman_pooled", "pearson_ci", "spearman_ci",
           "output_distance", "output_distance_relative", "scores", "truth_scores", "removed", "evaluations",
           "estimator_params")


def _bench(cache: Path, results: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "benchmark/", "--scale", "smoke", "--task", "lr-cancer",
           "--estimator", "exact", "--estimator", "cg", "--estimator", "grad-dot", "--baseline", "none",
           "--cache-dir", str(cache), "--results-dir", str(results), "-p", "no:cacheprovider", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.mark.filterwarnings("ignore")
def test_xdist_gives_the_serial_numbers(tmp_path):
    cache = tmp_path / "cache"
    # the parallel run first, on an empty cache: both workers need the same model and ground truth
    par = _bench(cache, tmp_path / "parallel", "-n", "2", "--dist", "loadgroup", "-v")
    assert par.returncode == 0, par.stdout + par.stderr
    # --dist loadgroup: the task's rows and its decomposition all ran on one worker (pytest ≥ 9.2
    # broke xdist's own grouping: benchmark/conftest.py schedules by task)
    ran = [line for line in par.stdout.splitlines() if "PASSED benchmark/" in line]
    assert len(ran) == 4 and len({line.split("]")[0] for line in ran}) == 1, ran
    # the controller kept each row's seconds for the next run's longest-first order (benchmark.schedule)
    timings = json.loads((cache / "timings.json").read_text())["smoke"]["lr-cancer"]
    assert sorted(timings) == ["cg", "decomposition", "exact", "grad-dot"] and min(timings.values()) > 0, timings
    ser = _bench(cache, tmp_path / "serial")
    assert ser.returncode == 0, ser.stdout + ser.stderr
    # the summary table is printed by the xdist controller too
    for out in (par.stdout, ser.stdout):
        assert "influence benchmark (smoke scale, against pbrf)" in out
        for est in ("exact", "cg", "grad-dot"):
            assert f"| lr-cancer | {est} " in out, out
    files = sorted(p.name for p in (tmp_path / "serial" / "smoke").glob("*.json"))
    assert len(files) == 3
    for name in files:
        a = json.loads((tmp_path / "serial" / "smoke" / name).read_text())
        b = json.loads((tmp_path / "parallel" / "smoke" / name).read_text())
        for key in NUMBERS:
            assert a.get(key) == b.get(key), f"{name}: {key} differs between serial and -n 2"
        assert a["ground_truth_certificate"]["key"] == b["ground_truth_certificate"]["key"]
    # the decomposition test (on by default at smoke) ran after the task's rows in both runs, on
    # the worker that scored them, and gives the same numbers
    for out in (par.stdout, ser.stdout):
        assert "decomposition (smoke scale" in out and "4 passed" in out, out
    a, b = (json.loads((tmp_path / run / "smoke" / "decomposition" / "lr-cancer.json").read_text())
            for run in ("serial", "parallel"))
    for key in ("effect", "gaps", "drift", "table2", "n_trusted"):
        assert a[key] == b[key], f"decomposition {key} differs between serial and -n 2"
    assert [g["gap"] for g in a["gaps"]] == ["warm-start gap", "proximity gap", "non-convergence gap",
                                             "linearization error", "solver error (exact)", "solver error (cg)"]


@pytest.mark.filterwarnings("ignore")
def test_xdist_runs_each_task_on_one_worker_in_any_order(tmp_path):
    """Three tasks, the recorded timings putting the last of the registry first: every task's
    rows still run on one worker (xdist sends workers indices into their own collection, so the
    order is changed in the queue of work units, not in the collection)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "timings.json").write_text(json.dumps({"smoke": {"mlp-energy": {"exact": 90.0, "grad-dot": 9.0},
                                                              "lr-cancer": {"exact": 1.0}}}))
    cmd = [sys.executable, "-m", "pytest", "benchmark/", "--scale", "smoke", "--task", "lr-cancer", "--task",
           "lr-diabetes", "--task", "mlp-energy", "--estimator", "exact", "--estimator", "grad-dot",
           "--no-decomposition", "--baseline", "none", "--cache-dir", str(cache), "--results-dir",
           str(tmp_path / "results"), "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup", "-v"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    workers: dict[str, set[str]] = {}
    for line in run.stdout.splitlines():
        if "PASSED benchmark/" in line:
            task = line.split("test_estimator[")[1].split("/")[0]
            workers.setdefault(task, set()).add(line.split("]")[0])
    assert sorted(workers) == ["lr-cancer", "lr-diabetes", "mlp-energy"], run.stdout
    assert all(len(w) == 1 for w in workers.values()), workers
    timings = json.loads((cache / "timings.json").read_text())["smoke"]
    assert sorted(timings["mlp-energy"]) == ["exact", "grad-dot"] and timings["mlp-energy"]["exact"] < 90.0
