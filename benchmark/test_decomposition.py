"""One test per task (parametrized in conftest.py, on by default at smoke scale): the five-gap
decomposition and Table 2 of benchmark/decomposition.py over every response function, with the
estimators' rows of this run reused. Writes <results-dir>/<scale>/decomposition/<task>.json."""
from __future__ import annotations

import numpy as np
import pytest

from tasks import get_task

from . import decomposition
from .runner import NoGroundTruth


def test_decomposition(bench, record_decomposition, decomposition_task: str, estimator_specs: list[str]):
    try:
        r = decomposition.decompose(bench, decomposition_task, estimator_specs)
    except NoGroundTruth as exc:
        pytest.skip(f"{decomposition_task}: {exc}")
    if bench.settings.results_dir is not None:
        decomposition.write_result(r, bench.settings.results_dir)
    record_decomposition(r)
    section = decomposition.task_markdown(r, None)
    failed = [g["gap"] + ": " + g["error"] for g in r["gaps"] if g["d"] is None]
    # every response function was computed and every distance is a finite, non-negative number
    for g in [*r["gaps"], *r["drift"]]:
        if g["d"] is not None:
            d = np.asarray(g["d"])
            assert d.shape == (r["n_trusted"],) and np.isfinite(d).all() and (d >= 0).all(), g
    assert np.isfinite(r["effect"]).all() and np.mean(r["effect"]) > 0, "removing an example changed nothing"
    for label, _, _ in decomposition.GAPS:
        assert f"| {label}" in section
    relative = decomposition.relative_gaps(r)
    # `exact` solves the linearized PBRF's own system: its solver error is the float floor
    if "solver error (exact)" in relative and relative["solver error (exact)"] is not None:
        assert relative["solver error (exact)"] < 1e-6, relative
    # a strongly convex objective trained to its optimum: cold and warm retraining reach the same
    # optimum, and influence matches cold-start leave-one-out (the paper's logistic regression)
    if get_task(decomposition_task).convex:
        assert relative["warm-start gap"] < 1e-3, relative
        exact = next((t for t in r["table2"] if t["estimator"] == "exact" and "error" not in t), None)
        if exact is not None:
            assert exact["cold"][0] >= 0.95, exact
    if failed:
        pytest.fail("estimator(s) failed in the decomposition: " + "; ".join(failed), pytrace=False)
