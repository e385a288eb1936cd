"""The order in which `-n N --dist loadgroup` hands tasks to the workers (benchmark/schedule.py):
longest expected first, from the last run's timings, else the committed results."""
from __future__ import annotations

import json
import math

import pytest

from benchmark import schedule
from benchmark.cache import CacheWarning


def test_row_of_reads_task_and_row_from_the_test_id():
    assert schedule.row_of("benchmark/test_benchmark.py::test_estimator[mlp-mnist/lissa]") == ("mlp-mnist", "lissa")
    assert schedule.row_of("benchmark/test_benchmark.py::test_estimator[lr-cancer/lissa(depth=200)]@lr-cancer") \
        == ("lr-cancer", "lissa(depth=200)")
    assert schedule.row_of("benchmark/test_benchmark.py::test_estimator[lr-cancer/tests/degraded.py:FlippedExact]") \
        == ("lr-cancer", "tests/degraded.py:FlippedExact")
    assert schedule.row_of("benchmark/test_decomposition.py::test_decomposition[ae-mnist]@ae-mnist") \
        == ("ae-mnist", "decomposition")
    assert schedule.row_of("tests/test_ridge.py::test_sign") is None


def test_timings_are_merged_per_row_and_a_damaged_file_is_replaced(tmp_path):
    schedule.record_timings(tmp_path, "smoke", {("a", "exact"): 1.0, ("a", "decomposition"): 0.5})
    schedule.record_timings(tmp_path, "smoke", {("a", "cg"): 2.0, ("b", "exact"): 3.0})
    schedule.record_timings(tmp_path, "cpu", {("a", "exact"): 9.0})
    assert schedule.load_timings(tmp_path) == {"smoke": {"a": {"exact": 1.0, "decomposition": 0.5, "cg": 2.0},
                                                         "b": {"exact": 3.0}},
                                               "cpu": {"a": {"exact": 9.0}}}
    (tmp_path / schedule.TIMINGS_FILE).write_text('{"smoke": {"a": ')  # truncated
    with pytest.warns(CacheWarning, match="not readable JSON"):
        assert schedule.load_timings(tmp_path) == {}
    with pytest.warns(CacheWarning):
        schedule.record_timings(tmp_path, "smoke", {("b", "exact"): 4.0})
    assert schedule.load_timings(tmp_path) == {"smoke": {"b": {"exact": 4.0}}}


def _committed(root, task, estimator, seconds, truth_seconds):
    (root / "smoke").mkdir(parents=True, exist_ok=True)
    row = {"task": task, "estimator": estimator, "seconds": seconds,
           "ground_truth_certificate": {"seconds": truth_seconds}}
    (root / "smoke" / f"{task}__{estimator}__pbrf.json").write_text(json.dumps(row))


def test_expected_seconds_from_timings_else_committed_rows_else_unknown(tmp_path):
    committed = tmp_path / "results"
    _committed(committed, "a", "exact", 2.0, 30.0)
    _committed(committed, "a", "lissa", 5.0, 0.01)  # the ground truth came from the cache here
    _committed(committed, "a", "trak", 100.0, 0.0)  # not selected
    timings = {"smoke": {"b": {"exact": 1.0, "lissa": 4.0, "decomposition": 2.0, "trak": 50.0}}}
    est = ["exact", "lissa"]
    # committed: the selected rows' seconds plus the ground truth's largest recorded seconds
    assert schedule.expected_seconds("a", "smoke", est, True, timings, committed) == pytest.approx(37.0)
    # recorded: the selected rows and the decomposition when it runs
    assert schedule.expected_seconds("b", "smoke", est, True, timings, committed) == pytest.approx(7.0)
    assert schedule.expected_seconds("b", "smoke", est, False, timings, committed) == pytest.approx(5.0)
    assert math.isinf(schedule.expected_seconds("c", "smoke", est, True, timings, committed))
    assert math.isinf(schedule.expected_seconds("a", "cpu", est, True, timings, committed))  # other scale


def test_longest_first_puts_unknown_tasks_first_and_keeps_ties_in_order():
    expected = {"a": 1.0, "b": 30.0, "c": math.inf, "d": 1.0, "e": 7.0}
    assert schedule.longest_first(["a", "b", "c", "d", "e"], expected) == ["c", "b", "e", "a", "d"]


def test_reorder_units_moves_whole_units_and_keeps_ties():
    queue = {"task:a": {"t1": False}, "task:b": {"t2": False, "t3": False}, "task:c": {"t4": False}, "other": {}}
    place = {"task:c": 0, "task:a": 1, "task:b": 1}
    schedule.reorder_units(queue, lambda scope: place.get(scope, -1))
    assert list(queue) == ["other", "task:c", "task:a", "task:b"]
    assert queue["task:b"] == {"t2": False, "t3": False}
