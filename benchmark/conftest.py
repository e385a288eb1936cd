"""The benchmark as a pytest plugin: `pytest benchmark/ [options]`.

Each test is one row, task × estimator; the run ends with a summary table and leaves one
JSON result per row in --results-dir/<scale>/.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from estimators import DEFAULT_ESTIMATORS, UnknownEstimator, make_estimator
from tasks import SCALES, TASKS, did_you_mean

from .report import summary_table
from .runner import REPO, Session, Settings

_SESSION = pytest.StashKey[Session]()


def pytest_addoption(parser):
    group = parser.getgroup("influence benchmark")
    group.addoption("--task", action="append", default=None, metavar="NAME",
                    help=f"task to run (repeatable; default: all): {', '.join(TASKS)}")
    group.addoption("--estimator", action="append", default=None, metavar="SPEC",
                    help="estimator: a registered name, package.module:Class or path/file.py:Class "
                         f"(repeatable; default: {', '.join(DEFAULT_ESTIMATORS)})")
    group.addoption("--scale", default="cpu", choices=SCALES, help="problem sizes (default: cpu)")
    group.addoption("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    group.addoption("--cache-dir", default=None, type=Path,
                    help="trained models and ground truth (default: $IFBENCH_CACHE_DIR or "
                         "~/.cache/influence-benchmark/cache)")
    group.addoption("--data-root", default=None, type=Path,
                    help="staged datasets (default: $IFBENCH_DATA_ROOT or ~/.cache/influence-benchmark/data)")
    group.addoption("--results-dir", default=REPO / "leaderboard" / "results", type=Path,
                    help="where the JSON result of every row goes (default: leaderboard/results)")
    group.addoption("--ground-truth", default="pbrf", choices=("pbrf", "linear"),
                    help="the response function scores are compared with (default: pbrf)")


def _selected(config) -> tuple[list[str], list[str]]:
    tasks = config.getoption("--task") or list(TASKS)
    for name in tasks:
        if name not in TASKS:
            raise pytest.UsageError(f"--task: unknown task {name!r}.{did_you_mean(name, TASKS)} "
                                    f"Known tasks: {', '.join(TASKS)}")
    estimators = config.getoption("--estimator") or list(DEFAULT_ESTIMATORS)
    for spec in estimators:
        try:
            make_estimator(spec)
        except UnknownEstimator as exc:
            raise pytest.UsageError(f"--estimator: {exc}") from None
        except Exception:
            pass  # constructible or not, a broken estimator is reported as a failed row
    return tasks, estimators


def pytest_configure(config):
    if not hasattr(config.option, "scale"):
        return
    _selected(config)
    config.stash[_SESSION] = Session(Settings(
        scale=config.getoption("--scale"), device=config.getoption("--device"),
        cache_dir=config.getoption("--cache-dir"), data_root=config.getoption("--data-root"),
        results_dir=config.getoption("--results-dir"), ground_truth=config.getoption("--ground-truth"),
    ))


def pytest_generate_tests(metafunc):
    if {"task_name", "estimator_spec"} <= set(metafunc.fixturenames):
        tasks, estimators = _selected(metafunc.config)
        metafunc.parametrize(("task_name", "estimator_spec"), [(t, e) for t in tasks for e in estimators],
                             ids=[f"{t}/{e}" for t in tasks for e in estimators])


@pytest.fixture(scope="session")
def bench(request) -> Session:
    return request.config.stash[_SESSION]


def pytest_report_header(config):
    if _SESSION not in config.stash:
        return None
    s = config.stash[_SESSION]
    return (f"influence benchmark: scale={s.settings.scale} device={s.settings.device} "
            f"ground truth={s.settings.ground_truth} cache={s.cache.root} data={s.data_root}")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _SESSION not in config.stash or not config.stash[_SESSION].rows:
        return
    session = config.stash[_SESSION]
    terminalreporter.section(f"influence benchmark ({session.settings.scale} scale, "
                             f"against {session.settings.ground_truth})")
    terminalreporter.write_line(summary_table(session.rows))
    if session.settings.results_dir:
        terminalreporter.write_line(f"results: {session.settings.results_dir / session.settings.scale}")
