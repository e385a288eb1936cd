"""One test per task × estimator (parametrized in conftest.py): score it, fail on a failed row."""
from __future__ import annotations

import pytest


def test_estimator(bench, task_name: str, estimator_spec: str):
    result = bench.run(task_name, estimator_spec)
    if result["status"] != "ok":
        pytest.fail(f"{task_name} / {estimator_spec}: {result['error']}", pytrace=False)
