"""benchmark.cost: the measured ground-truth cost of a task, and its table on the leaderboard
for tasks without rows at that scale."""
from __future__ import annotations

import pytest

from benchmark import cost
from benchmark.leaderboard import cost_section


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    root = tmp_path_factory.mktemp("cost")
    return root, cost.measure_task("lr-cancer", "smoke", root / "data", root / "cache", max_seconds=600)


def test_measures_one_pbrf_solve_and_projects(measured):
    _, r = measured
    assert r["pbrf_finished"] and r["pbrf_status"] == "converged"
    assert r["n_removed"] == 10 and r["n_params"] == 31 and r["dense"]
    for key in ("forward_seconds", "gradients_seconds", "gnvp_seconds", "setup_seconds", "pbrf_seconds"):
        assert r[key] > 0, key
    assert r["projected_ground_truth_seconds"] == pytest.approx(r["setup_seconds"] + 10 * r["pbrf_seconds"])
    # the default LiSSA's depth is its rule's for this problem, and its cost is projected from it
    assert 100 <= r["lissa_depth"] <= 2000 and not r["lissa_closed_form"]  # N = 455 > its batch of 128
    assert r["lissa_step_seconds"] > 0
    assert r["lissa_projected_seconds"] == pytest.approx(r["lissa_depth"] * r["lissa_step_seconds"])


def test_stopped_solve_is_a_lower_bound(measured):
    root, _ = measured
    r = cost.measure_task("lr-cancer", "smoke", root / "data", root / "cache", max_seconds=1e-9)
    assert not r["pbrf_finished"] and r["projected_ground_truth_seconds"] is None
    assert "stopped" in cost.cost_table([r])


def test_leaderboard_lists_tasks_without_rows(measured, tmp_path):
    _, r = measured
    cost.write_result(r, tmp_path)
    [loaded] = cost.load_results(tmp_path)
    assert loaded["task"] == "lr-cancer"
    text = "\n".join(cost_section([], [loaded]))
    assert "Tasks without smoke-scale rows" in text and "| lr-cancer |" in text
    row = {"task": "lr-cancer", "scale": "smoke"}
    assert cost_section([row], [loaded]) == []  # a task with rows is not listed
