"""The order in which `-n N --dist loadgroup` hands tasks to its workers: longest first.

A task's rows and its decomposition run on one worker (one work unit each task; conftest). In the
order of the registry the slowest task could start last while the other workers sat idle: at
`smoke`, with the ground truth cached, the Transformer (about 15 s of rows) came last and one
worker idled 13 s of a 59 s run. Handing out the units longest first (the LPT rule for
scheduling on identical machines, within 4/3 of the best makespan) ends them nearly together.

A task's expected seconds come from the last run that measured them, kept per row in
`<cache>/timings.json` ({scale: {task: {estimator spec or "decomposition": seconds}}}, setup,
call and teardown together, so a row that computed the ground truth carries its cost), else from
the committed results of the scale (`leaderboard/results/<scale>/`: the rows' seconds plus the
ground truth's, as its certificate recorded it), else it is unknown and goes first. The file is
only a hint: an unreadable one is ignored and rewritten, and no number depends on the order.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

from .cache import CacheWarning, atomic_write_text

TIMINGS_FILE = "timings.json"
DECOMPOSITION = "decomposition"

_TEST_ID = re.compile(r"::test_(estimator|decomposition)\[(.+)\](?:@[^@\]]*)?$")


def row_of(nodeid: str) -> tuple[str, str] | None:
    """(task, estimator spec or "decomposition") of a benchmark test id, else None."""
    match = _TEST_ID.search(nodeid)
    if match is None:
        return None
    kind, param = match.groups()
    if kind == "decomposition":
        return param, DECOMPOSITION
    task, _, spec = param.partition("/")
    return (task, spec) if spec else None


def load_timings(cache_root: Path) -> dict:
    """{scale: {task: {row: seconds}}} recorded under `cache_root`; {} when absent or unreadable."""
    path = Path(cache_root) / TIMINGS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        warnings.warn(f"{path} is not readable JSON ({exc}); ignoring it (it is rewritten at the end of the run)",
                      CacheWarning, stacklevel=2)
        return {}
    return data if isinstance(data, dict) else {}


def record_timings(cache_root: Path, scale: str, seconds: dict[tuple[str, str], float]) -> None:
    """Merge the measured seconds of (task, row) into `<cache_root>/timings.json` (atomic write)."""
    if not seconds:
        return
    data = load_timings(cache_root)
    by_task = data.get(scale)
    if not isinstance(by_task, dict):
        by_task = data[scale] = {}
    for (task, row), s in seconds.items():
        if not isinstance(by_task.get(task), dict):
            by_task[task] = {}
        by_task[task][row] = round(float(s), 3)
    atomic_write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", Path(cache_root) / TIMINGS_FILE)


def _committed_seconds(results_dir: Path, task: str, estimators: list[str]) -> float | None:
    """Σ of the committed rows' seconds for `estimators`, plus the ground truth's largest recorded
    seconds; None when no row of the task is committed."""
    rows_s, truth_s, found = 0.0, 0.0, False
    for path in Path(results_dir).glob(f"{task}__*.json"):
        try:
            row = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(row, dict) or row.get("task") != task:
            continue
        certificate = row.get("ground_truth_certificate") or {}
        truth_s = max(truth_s, float(certificate.get("seconds") or 0.0))
        if row.get("estimator") in estimators:
            rows_s += float(row.get("seconds") or 0.0)
            found = True
    return rows_s + truth_s if found else None


def expected_seconds(task: str, scale: str, estimators: list[str], decomposition: bool, timings: dict,
                     committed_dir: Path) -> float:
    """The seconds a task's work unit is expected to take (module docstring); inf when unknown."""
    recorded = (timings.get(scale) or {}).get(task)
    if isinstance(recorded, dict):
        rows = list(estimators) + ([DECOMPOSITION] if decomposition else [])
        known = [recorded[r] for r in rows if isinstance(recorded.get(r), (int, float))]
        if known:
            return float(sum(known))
    committed = _committed_seconds(Path(committed_dir) / scale, task, estimators)
    return math.inf if committed is None else committed


def longest_first(tasks: list[str], expected: dict[str, float]) -> list[str]:
    """`tasks` by expected seconds, longest (and unknown) first; ties keep their order."""
    return sorted(tasks, key=lambda t: -expected.get(t, math.inf))


def reorder_units(workqueue: dict, place) -> None:
    """Reorder xdist's queue of work units ({scope: tests}, handed out from the front) in place
    by place(scope), ties in their order. The workers' collections keep their order: xdist
    sends them indices into those."""
    units = sorted(workqueue.items(), key=lambda item: place(item[0]))
    workqueue.clear()
    workqueue.update(units)
