"""The benchmark as a pytest plugin: `pytest benchmark/ [options]`.

Each test is one row, task × estimator; the run ends with a summary table and leaves one
JSON result per row in --results-dir/<scale>/. With --decomposition (the default at smoke
scale) one more test per task computes the five-gap decomposition and Table 2 over every
response function (benchmark/decomposition.py), reusing the rows' estimates, and leaves
--results-dir/<scale>/decomposition/<task>.json; `python -m benchmark.leaderboard` renders them.
A row also fails when its main number falls below the committed baseline (--baseline,
benchmark/guard.py).

Parallel runs (pytest-xdist, `-n 2`): every worker builds its own Session; the ground truth
cache's per-entry locks make each entry computed once. Each test attaches its row (without the
score matrices) to its report's user_properties, which xdist sends to the controller, so the
summary table and --update-baseline work the same with and without -n.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from estimators import (DEFAULT_ESTIMATORS, EstimatorSpecError, UnknownEstimator, canonical_spec, make_estimator,
                        parse_param)
from tasks import SCALES, TASKS, default_tasks, did_you_mean

from . import guard, schedule
from .ground_truth import ALL_RESPONSES
from .measure import available_cpus
from .report import summary_table
from .runner import REPO, Session, Settings

_SESSION = pytest.StashKey[Session]()
_ROW = "ifbench_row"  # the user_properties name under which a test reports its row
_DECOMPOSITION = "ifbench_decomposition"  # ... and a decomposition test its summary


def pytest_addoption(parser):
    group = parser.getgroup("influence benchmark")
    group.addoption("--task", action="append", default=None, metavar="NAME",
                    help=f"task to run (repeatable; default: every task meant for the scale, i.e. all but the "
                         f"autoencoder, CNNs and Transformer at cpu scale): {', '.join(TASKS)}")
    group.addoption("--estimator", action="append", default=None, metavar="SPEC",
                    help="estimator: a registered name, package.module:Class or path/file.py:Class, optionally "
                         "with constructor arguments as Python literals: 'lissa(depth=200,batch_size=64)' "
                         f"(repeatable; default: {', '.join(DEFAULT_ESTIMATORS)})")
    group.addoption("--estimator-param", action="append", default=None, metavar="KEY=VALUE",
                    help="constructor argument for every --estimator (repeatable; VALUE is a Python literal, "
                         "else a string); recorded in the result and part of the row's name")
    group.addoption("--time-budget", default=None, type=float, metavar="SECONDS",
                    help="a row whose fit + scores take longer fails (interrupted at the next call of a "
                         "problem operator, else measured after the fact)")
    group.addoption("--baseline", default=REPO / "leaderboard" / "baseline.json", type=Path, metavar="PATH",
                    help="accuracy guard: a row fails when its mean per-query Pearson falls below this "
                         "baseline's entry minus its tolerance (default: leaderboard/baseline.json; "
                         "'none' disables the guard)")
    group.addoption("--update-baseline", action="store_true", default=False,
                    help="write the rows that ran into --baseline instead of failing on it")
    group.addoption("--scale", default="cpu", choices=SCALES, help="problem sizes (default: cpu)")
    group.addoption("--threads", type=int, default=None,
                    help="torch intra-op threads (default: 1 at smoke scale, where operations are small and "
                         "threads only add overhead; under -n N the CPUs divided by N; torch's default otherwise)")
    group.addoption("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    group.addoption("--cache-dir", default=None, type=Path,
                    help="trained models and ground truth (default: $IFBENCH_CACHE_DIR or "
                         "~/.cache/influence-benchmark/cache)")
    group.addoption("--data-root", default=None, type=Path,
                    help="staged datasets (default: $IFBENCH_DATA_ROOT or ~/.cache/influence-benchmark/data)")
    group.addoption("--results-dir", default=REPO / "leaderboard" / "results", type=Path,
                    help="where the JSON result of every row goes (default: leaderboard/results)")
    group.addoption("--ground-truth", default=None, choices=ALL_RESPONSES,
                    help="the response function scores are compared with (default: each task's own: pbrf, "
                         "pbrf-epochs for the batch-norm nets VGG13 and ResNet-20); the retraining "
                         "ones (cold, warm, proximal; *-controlled: relative to the run with nothing "
                         "removed) are computed on first use and cached")
    group.addoption("--decomposition", dest="decomposition", action="store_true", default=None,
                    help="also run the five-gap decomposition and Table 2 per task (cold, warm and proximal "
                         "retraining, computed on first use and cached; default: on at smoke scale only)")
    group.addoption("--no-decomposition", dest="decomposition", action="store_false",
                    help="do not run the decomposition (also at smoke scale)")


def _selected(config) -> tuple[list[str], list[str]]:
    tasks = config.getoption("--task") or default_tasks(config.getoption("--scale"))
    for name in tasks:
        if name not in TASKS:
            raise pytest.UsageError(f"--task: unknown task {name!r}.{did_you_mean(name, TASKS)} "
                                    f"Known tasks: {', '.join(TASKS)}")
    try:
        params = dict(parse_param(p) for p in config.getoption("estimator_param") or [])
    except EstimatorSpecError as exc:
        raise pytest.UsageError(f"--estimator-param: {exc}") from None
    estimators = []
    for spec in config.getoption("--estimator") or list(DEFAULT_ESTIMATORS):
        try:
            spec = canonical_spec(spec, params)  # the row's name: arguments merged, sorted, no spaces
            make_estimator(spec)
        except (UnknownEstimator, EstimatorSpecError) as exc:
            raise pytest.UsageError(f"--estimator: {exc}") from None
        except Exception:
            pass  # constructible or not, a broken estimator is reported as a failed row
        if spec not in estimators:
            estimators.append(spec)
    return tasks, estimators


def _baseline_path(config) -> Path | None:
    path = config.getoption("--baseline")
    return None if str(path).lower() in ("none", "") else Path(path)


def default_threads(config) -> int | None:
    """--threads, else 1 at smoke scale (tiny operations), else, under pytest-xdist, the CPUs
    divided among the workers (no oversubscription: -n 2 on 2 cores gives each worker 1 thread),
    else None (torch's default)."""
    if config.getoption("--threads"):
        return config.getoption("--threads")
    if config.getoption("--scale") == "smoke":
        return 1
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1) or 1)
    return max(1, available_cpus() // workers) if workers > 1 else None


def pytest_configure(config):
    if not hasattr(config.option, "scale"):
        return
    config.addinivalue_line("markers", "xdist_group(name): rows of one task (pytest-xdist --dist loadgroup)")
    _selected(config)
    budget = config.getoption("time_budget")
    if budget is not None and budget <= 0:
        raise pytest.UsageError(f"--time-budget: expected a positive number of seconds, got {budget}")
    baseline = _baseline_path(config)
    if baseline is not None:
        try:
            guard.load(baseline)
        except ValueError as exc:
            raise pytest.UsageError(f"--baseline: {exc}") from None
    if config.getoption("--log-cli-level", None) is None and not config.getini("log_cli"):
        # live progress of the ground truth and retraining ("ifbench" logger, one line per step)
        config.option.log_cli_level = "INFO"
    threads = default_threads(config)
    if threads is not None:
        torch.set_num_threads(threads)
    config.stash[_SESSION] = Session(Settings(
        scale=config.getoption("--scale"), device=config.getoption("--device"),
        cache_dir=config.getoption("--cache-dir"), data_root=config.getoption("--data-root"),
        results_dir=config.getoption("--results-dir"), ground_truth=config.getoption("--ground-truth"),
        time_budget=budget, baseline=baseline,
    ))
    config.pluginmanager.register(_Rows(config), "influence-benchmark-rows")


def _decomposition_on(config) -> bool:
    on = config.getoption("decomposition")
    return config.getoption("--scale") == "smoke" if on is None else on


def pytest_generate_tests(metafunc):
    if {"task_name", "estimator_spec"} <= set(metafunc.fixturenames):
        tasks, estimators = _selected(metafunc.config)
        metafunc.parametrize(("task_name", "estimator_spec"),
                             [pytest.param(t, e, marks=pytest.mark.xdist_group(t)) for t in tasks for e in estimators],
                             ids=[f"{t}/{e}" for t in tasks for e in estimators])
    if "decomposition_task" in metafunc.fixturenames:
        # the same xdist group as the task's rows: the same worker, after them, reusing their estimates
        tasks, _ = _selected(metafunc.config)
        metafunc.parametrize("decomposition_task", [pytest.param(t, marks=pytest.mark.xdist_group(t)) for t in tasks],
                             ids=tasks)


def _task_order(config) -> dict[str, int]:
    """Each selected task's place when handed to the workers: longest expected first
    (benchmark.schedule)."""
    tasks, estimators = _selected(config)
    timings = schedule.load_timings(config.stash[_SESSION].cache.root)
    committed = REPO / "leaderboard" / "results"
    expected = {t: schedule.expected_seconds(t, config.getoption("--scale"), estimators, _decomposition_on(config),
                                             timings, committed) for t in tasks}
    return {t: i for i, t in enumerate(schedule.longest_first(tasks, expected))}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup`: one work unit per task (its rows, then its decomposition), read from the
    test id, handed out longest first (benchmark.schedule). xdist's own grouping appends the
    xdist_group mark to the node id, which pytest ≥ 9.2 no longer lets it change
    (pytest-xdist#1386): the rows of one task were spread over the workers, each loading the
    task and the decomposition fitting its estimators again."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class TaskScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            row = schedule.row_of(nodeid)
            return "task:" + row[0] if row else super()._split_scope(nodeid)

        def _assign_work_unit(self, node) -> None:
            if not getattr(self, "_ordered", False) and _SESSION in config.stash:  # before the first unit goes out
                self._ordered = True
                place = _task_order(config)
                schedule.reorder_units(self.workqueue, lambda scope: place.get(scope.removeprefix("task:"), -1))
            super()._assign_work_unit(node)

    return TaskScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    if not hasattr(config.option, "scale") or _decomposition_on(config):
        return
    off = [item for item in items if "decomposition_task" in getattr(item, "fixturenames", ())]
    if off:
        items[:] = [item for item in items if item not in off]
        config.hook.pytest_deselected(items=off)


@pytest.fixture(scope="session")
def bench(request) -> Session:
    return request.config.stash[_SESSION]


@pytest.fixture
def record_row(request):
    """record_row(result): attach the row (without score matrices) to this test's report."""

    def record(result: dict) -> None:
        slim = {k: v for k, v in result.items() if k not in ("scores", "truth_scores", "removed", "traceback")}
        request.node.user_properties.append((_ROW, json.loads(json.dumps(slim, default=str))))

    return record


@pytest.fixture
def estimator_specs(request) -> list[str]:
    """The selected estimators (canonical specs), in order."""
    return _selected(request.config)[1]


@pytest.fixture
def record_decomposition(request):
    """record_decomposition(result): attach a decomposition's summary to this test's report."""

    def record(r: dict) -> None:
        from .decomposition import summarize
        request.node.user_properties.append((_DECOMPOSITION, summarize(r)))

    return record


@pytest.fixture
def guard_enforced(request) -> bool:
    """Whether a row below its baseline fails (not while --update-baseline rewrites it)."""
    return not request.config.getoption("--update-baseline")


class _Rows:
    """Collects the rows from the test reports (in the xdist controller too), updates the baseline."""

    def __init__(self, config):
        self.config = config
        self.rows: list[dict] = []
        self.decompositions: list[dict] = []
        self.notes: list[str] = []
        self.seconds: dict[tuple[str, str], float] = {}  # (task, row) -> setup + call + teardown

    def pytest_runtest_logreport(self, report):
        row = schedule.row_of(report.nodeid)
        if row is not None:
            self.seconds[row] = self.seconds.get(row, 0.0) + report.duration
        if report.when == "call":
            self.rows.extend(value for name, value in report.user_properties if name == _ROW)
            self.decompositions.extend(value for name, value in report.user_properties if name == _DECOMPOSITION)

    def ordered(self) -> list[dict]:
        tasks, estimators = _selected(self.config)
        position = {(t, e): i for i, (t, e) in enumerate((t, e) for t in tasks for e in estimators)}
        return sorted(self.rows, key=lambda r: position.get((r["task"], r["estimator"]), len(position)))

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session):
        if hasattr(self.config, "workerinput"):
            return
        try:  # for the next run's order of tasks (benchmark.schedule); a hint, never an error
            schedule.record_timings(self.config.stash[_SESSION].cache.root, self.config.getoption("--scale"),
                                    self.seconds)
        except OSError as exc:
            self.notes.append(f"note: could not record the rows' timings in the cache ({exc})")
        if not self.config.getoption("--update-baseline"):
            return
        path = _baseline_path(self.config)
        if path is None:
            self.notes.append("--update-baseline: no --baseline file to write (--baseline none)")
            return
        written = guard.update(path, self.rows)
        self.notes.append(f"baseline updated: {len(written)} entr{'y' if len(written) == 1 else 'ies'} written to "
                          f"{path}" + ("" if written else " (no row succeeded)"))


def pytest_report_header(config):
    if _SESSION not in config.stash:
        return None
    s = config.stash[_SESSION]
    budget = f" time budget={s.settings.time_budget:g}s" if s.settings.time_budget else ""
    header = (f"influence benchmark: scale={s.settings.scale} device={s.settings.device} "
              f"ground truth={s.settings.ground_truth or 'per task'} cache={s.cache.root} data={s.data_root} "
              f"baseline={s.settings.baseline}{budget}")
    left_out = [t for t in TASKS if t not in default_tasks(s.settings.scale)]
    if left_out and not config.getoption("--task"):
        header += (f"\nnot run by default at {s.settings.scale} scale (too slow there; the leaderboard lists their "
                   f"measured cost; --task NAME runs one): {', '.join(left_out)}")
    return header


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    plugin = config.pluginmanager.get_plugin("influence-benchmark-rows")
    if _SESSION not in config.stash or plugin is None or hasattr(config, "workerinput"):
        return
    session = config.stash[_SESSION]
    rows = plugin.ordered()
    if rows:
        terminalreporter.section(f"influence benchmark ({session.settings.scale} scale, "
                                 f"against {', '.join(sorted({r.get('ground_truth') or 'pbrf' for r in rows}))})")
        terminalreporter.write_line(summary_table(rows))
        missing = [f"{r['task']}/{r['estimator']}" for r in rows
                   if (r.get("guard") or {}).get("status") == "no baseline"]
        if missing and not config.getoption("--update-baseline"):
            terminalreporter.write_line(f"note: {len(missing)} row(s) have no baseline entry and passed the accuracy "
                                        f"guard unchecked: {', '.join(missing)}")
        if session.settings.results_dir:
            terminalreporter.write_line(f"results: {session.settings.results_dir / session.settings.scale}")
    if plugin.decompositions:
        from .decomposition import decomposition_summary
        order = {t: i for i, t in enumerate(TASKS)}
        terminalreporter.section(f"decomposition ({session.settings.scale} scale; gaps relative to d(θˢ, PBRF))")
        terminalreporter.write_line(decomposition_summary(sorted(plugin.decompositions,
                                                                 key=lambda d: order.get(d["task"], 999))))
        if session.settings.results_dir:
            terminalreporter.write_line(f"decomposition results: {session.settings.results_dir / session.settings.scale}"
                                        "/decomposition (`python -m benchmark.leaderboard` renders DECOMPOSITION.md)")
    for note in plugin.notes:
        terminalreporter.write_line(note)
