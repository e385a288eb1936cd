"""One test per task × estimator (parametrized in conftest.py): score it, fail on a failed row
or on a main number below the baseline (the accuracy guard)."""
from __future__ import annotations

import warnings

import pytest


def test_estimator(bench, record_row, guard_enforced, task_name: str, estimator_spec: str):
    result = bench.run(task_name, estimator_spec)
    record_row(result)
    if result.get("global_state_changed"):
        warnings.warn(f"{task_name} / {estimator_spec} changed torch's global state "
                      f"({', '.join(result['global_state_changed'])}); the harness put it back", stacklevel=1)
    if result["status"] in ("no_ground_truth", "undefined"):
        pytest.skip(f"{task_name} / {estimator_spec}: {result['error']}")
    if result["status"] != "ok":
        pytest.fail(f"{task_name} / {estimator_spec}: {result['error']}", pytrace=False)
    verdict = result.get("guard") or {}
    if verdict.get("status") == "fail" and guard_enforced:
        pytest.fail(f"{task_name} / {estimator_spec}: accuracy guard: {verdict['message']}", pytrace=False)
