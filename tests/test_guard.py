"""The accuracy guard (benchmark/guard.py): its rule on known numbers, the committed baseline's
shape, and end to end: a planted degraded estimator fails `pytest benchmark/` against a baseline
that has an entry for it, saying by how much.

The end-to-end tests run the benchmark in a subprocess on lr-cancer at smoke scale (data bundled
with scikit-learn; the model and ground truth are computed once into a cache this module shares).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark import guard

REPO = Path(__file__).resolve().parent.parent


def row(pearson=0.9, ci=(0.8, 0.96), estimator="exact", status="ok", task="lr-cancer", scale="smoke"):
    return {"task": task, "estimator": estimator, "scale": scale, "ground_truth": "pbrf", "status": status,
            "pearson": pearson, "pearson_ci": list(ci) if ci else None, "spearman": 0.9,
            "provenance": {"commit": "abc", "torch": "2", "device": "cpu", "date": "today",
                           "ground_truth_key": "k"}}


# ---------------------------------------------------------------- the rule


def test_tolerance_is_the_half_width_of_the_interval_with_a_floor():
    assert guard.tolerance(row(ci=(0.8, 0.96))) == pytest.approx(0.08)
    assert guard.tolerance(row(ci=(0.999, 1.0))) == guard.TOLERANCE_FLOOR
    assert guard.tolerance(row(ci=None)) == guard.TOLERANCE_FLOOR


def test_verdicts(tmp_path):
    path = tmp_path / "baseline.json"
    guard.update(path, [row(pearson=0.9, ci=(0.8, 0.96))])
    baseline = guard.load(path)
    assert guard.verdict(row(pearson=0.83), baseline)["status"] == "pass"  # 0.9 − 0.08 = 0.82
    bad = guard.verdict(row(pearson=0.5), baseline, "b.json")
    assert bad["status"] == "fail"
    assert bad["shortfall"] == pytest.approx(0.32) and bad["drop"] == pytest.approx(0.4)
    assert "0.4000 below the baseline 0.9000" in bad["message"] and "0.3200 beyond" in bad["message"]
    assert guard.verdict(row(pearson=0.5, estimator="cg"), baseline)["status"] == "no baseline"
    assert guard.verdict(row(pearson=0.5, scale="cpu"), baseline)["status"] == "no baseline"
    assert guard.verdict(row(status="failed", pearson=None), baseline)["status"] == "not applicable"


def test_update_keeps_other_entries_and_skips_failed_rows(tmp_path):
    path = tmp_path / "baseline.json"
    guard.update(path, [row(estimator="exact"), row(estimator="cg", pearson=0.7)])
    written = guard.update(path, [row(estimator="exact", pearson=0.95), row(estimator="lissa", status="failed",
                                                                           pearson=None)])
    assert written == [("smoke", "pbrf", "lr-cancer", "exact")]
    entries = guard.load(path)["entries"]["smoke"]["pbrf"]["lr-cancer"]
    assert set(entries) == {"exact", "cg"} and entries["exact"]["pearson"] == 0.95


def test_missing_baseline_is_empty_and_a_broken_one_is_an_error(tmp_path):
    assert guard.load(tmp_path / "nope.json")["entries"] == {}
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        guard.load(broken)


def test_committed_baseline_is_well_formed():
    path = REPO / "leaderboard" / "baseline.json"
    data = guard.load(path)
    assert data["floor"] == guard.TOLERANCE_FLOOR
    for scale, by_gt in data["entries"].items():
        for gt, by_task in by_gt.items():
            for task, by_est in by_task.items():
                for est, entry in by_est.items():
                    lo, hi = entry["pearson_ci"]
                    assert lo <= entry["pearson"] + 1e-12 and entry["pearson"] <= hi + 1e-12, (scale, task, est)
                    assert entry["tolerance"] == pytest.approx(max((hi - lo) / 2, guard.TOLERANCE_FLOOR))


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("guard-cache")


def bench(cache_dir: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "benchmark/", "--scale", "smoke", "--task", "lr-cancer",
           "--no-decomposition", "--cache-dir", str(cache_dir), "--results-dir", str(tmp / "results"),
           "-p", "no:cacheprovider", "-q", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


def test_degraded_estimator_fails_the_guard(cache_dir, tmp_path):
    baseline = tmp_path / "baseline.json"
    # 1. record the baseline of the healthy estimator
    out = bench(cache_dir, tmp_path, "--estimator", "exact", "--baseline", str(baseline), "--update-baseline")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "baseline updated: 1 entry written" in out.stdout
    assert "1 passed, 1 deselected" in out.stdout  # --no-decomposition at smoke
    data = json.loads(baseline.read_text())
    healthy = data["entries"]["smoke"]["pbrf"]["lr-cancer"]["exact"]
    assert healthy["pearson"] > 0.9
    # 2. the planted estimator's entry holds the numbers it had when it was healthy
    data["entries"]["smoke"]["pbrf"]["lr-cancer"]["tests/degraded.py:FlippedExact"] = healthy
    baseline.write_text(json.dumps(data))
    # 3. the guard fails it, passes the healthy one, and lets a row without an entry pass with a note
    out = bench(cache_dir, tmp_path, "--estimator", "exact", "--estimator", "tests/degraded.py:FlippedExact",
                "--estimator", "grad-dot", "--baseline", str(baseline))
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert "1 failed, 2 passed" in text
    assert "FAILED benchmark/test_benchmark.py::test_estimator[lr-cancer/tests/degraded.py:FlippedExact]" in text
    assert "accuracy guard: mean per-query Pearson -0.99" in text
    assert "below the baseline" in text and "beyond its tolerance" in text
    assert "no baseline entry" in text and "lr-cancer/grad-dot" in text
    result = json.loads((tmp_path / "results" / "smoke" /
                         "lr-cancer__tests_degraded.py_FlippedExact__pbrf.json").read_text())
    assert result["status"] == "ok" and result["guard"]["status"] == "fail"
    assert result["guard"]["drop"] == pytest.approx(healthy["pearson"] - result["pearson"])
    # 4. --update-baseline rewrites the entries of the rows that ran instead of failing
    out = bench(cache_dir, tmp_path, "--estimator", "tests/degraded.py:FlippedExact", "--baseline", str(baseline),
                "--update-baseline")
    assert out.returncode == 0, out.stdout + out.stderr
    entries = json.loads(baseline.read_text())["entries"]["smoke"]["pbrf"]["lr-cancer"]
    assert entries["tests/degraded.py:FlippedExact"]["pearson"] < -0.9
    assert entries["exact"] == healthy  # untouched


def test_baseline_none_disables_the_guard(cache_dir, tmp_path):
    out = bench(cache_dir, tmp_path, "--estimator", "tests/degraded.py:FlippedExact", "--baseline", "none")
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_committed_row_has_a_baseline_entry():
    """No row of the committed leaderboard passes the guard unchecked: each ok row under
    leaderboard/results has its entry in leaderboard/baseline.json, with its own main number
    (`python -m benchmark.guard` writes them)."""
    from benchmark.leaderboard import REPO, load_results
    baseline = guard.load(REPO / "leaderboard" / "baseline.json")
    rows = [r for r in load_results(REPO / "leaderboard" / "results") if r["status"] == "ok"]
    assert rows, "no committed result rows"
    missing = [guard.key(r) for r in rows if guard.lookup(baseline, r) is None]
    assert not missing, f"committed rows without a baseline entry: {missing}"
    stale = [guard.key(r) for r in rows if guard.lookup(baseline, r)["pearson"] != pytest.approx(r["pearson"], abs=1e-9)]
    assert not stale, f"baseline entries that are not the committed rows' numbers: {stale}"


def test_baseline_from_result_files(tmp_path):
    rows_dir = tmp_path / "results" / "cpu"
    rows_dir.mkdir(parents=True)
    ok = {"task": "t", "estimator": "e", "scale": "cpu", "ground_truth": "pbrf", "status": "ok", "pearson": 0.8,
          "pearson_ci": [0.7, 0.9]}
    (rows_dir / "a.json").write_text(json.dumps(ok))
    (rows_dir / "b.json").write_text(json.dumps({**ok, "estimator": "f", "status": "undefined", "pearson": None}))
    assert guard.main(["--from", str(tmp_path / "results"), "--baseline", str(tmp_path / "b.json")]) == 0
    entries = guard.load(tmp_path / "b.json")["entries"]["cpu"]["pbrf"]["t"]
    assert set(entries) == {"e"} and entries["e"]["tolerance"] == pytest.approx(0.1)
