"""GPU check: the paper scale of a CNN task on CUDA, timed, with its memory recorded.

Marked `gpu`; skipped (with the reason) where torch.cuda.is_available() is false or the data is
not staged. `pytest -m gpu` runs it alone. It builds the paper-scale problem of `lenet-mnist`
(6,000 MNIST images, LeNet-5, d = 61,706, 200 epochs of SGD), its PBRF and linearized-PBRF
ground truth (float64 CG: d is above dense_max_params), and scores the default estimators, all on
`cuda`, and writes leaderboard/gpu/<task>-paper.json: device, seconds and peak device memory of
each stage, the ground truth's certificates in short, and each row's numbers.

Environment: IFBENCH_GPU_TASKS (comma-separated, default lenet-mnist), IFBENCH_GPU_SCALE (default
paper), IFBENCH_GPU_ESTIMATORS
(default: the four defaults), IFBENCH_CACHE_DIR (default: a fresh temporary folder, so that the
times are those of computing, not of loading), IFBENCH_DATA_ROOT.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "leaderboard" / "gpu"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False): "
                                                             "the paper-scale GPU check needs one"),
]

TASKS = [t for t in os.environ.get("IFBENCH_GPU_TASKS", "lenet-mnist").split(",") if t]
SCALE = os.environ.get("IFBENCH_GPU_SCALE", "paper")
DEVICE = "cuda"


def _stage(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    value = fn()
    torch.cuda.synchronize()
    return value, {"seconds": time.perf_counter() - start,
                   "peak_memory_mb": torch.cuda.max_memory_allocated() / 2 ** 20}


@pytest.mark.parametrize("task_name", TASKS)
def test_paper_scale_on_gpu(task_name, tmp_path):
    from benchmark.cache import Cache
    from benchmark.ground_truth import build_problem, load_ground_truth
    from benchmark.runner import Session, Settings, ground_truth_summary
    from estimators import DEFAULT_ESTIMATORS
    from tasks import get_task
    from tasks.data import DatasetMissing, default_data_root

    task = get_task(task_name)
    data_root = default_data_root()
    cache = Cache(os.environ.get("IFBENCH_CACHE_DIR") or tmp_path / "cache")
    try:
        task.data(SCALE, data_root)
    except DatasetMissing as exc:
        pytest.skip(f"dataset not staged in {data_root}: {exc}")
    report = {
        "task": task_name, "scale": SCALE, "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "ground_truth_config": dataclasses.asdict(task.ground_truth_config(SCALE)),
        "stages": {},
    }
    problem, report["stages"]["build_problem"] = _stage(lambda: build_problem(task, SCALE, data_root, cache, DEVICE))
    report.update(n_train=problem.n_train, n_params=problem.n_params, training_certificate=problem.training_certificate)
    (truth, cached), report["stages"]["ground_truth"] = _stage(lambda: load_ground_truth(task, SCALE, problem, cache))
    report["ground_truth_cached"] = cached
    report["ground_truth"] = {name: ground_truth_summary(truth, name) for name in truth.responses}

    session = Session(Settings(scale=SCALE, device=DEVICE, cache_dir=cache.root, data_root=data_root,
                               results_dir=None))
    session._tasks[task_name] = (problem, truth, cached)
    estimators = [e for e in os.environ.get("IFBENCH_GPU_ESTIMATORS", ",".join(DEFAULT_ESTIMATORS)).split(",") if e]
    rows = {}
    for spec in estimators:  # noqa: B007
        row, stage = _stage(lambda: session.run(task_name, spec))
        rows[spec] = {k: row.get(k) for k in ("status", "error", "pearson", "spearman", "pearson_pooled",
                                                "output_distance_relative", "seconds", "seconds_fit",
                                                "seconds_scores", "peak_memory_mb", "evaluations", "solver")}
        rows[spec]["stage"] = stage
    report["estimators"] = rows
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{task_name}-{SCALE}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")

    assert torch.isfinite(truth.scores("pbrf")).all() and torch.isfinite(truth.scores("linear")).all()
    failed = {spec: r["error"] for spec, r in rows.items() if r["status"] != "ok"}
    assert not failed, f"rows failed on cuda: {failed} (report: {path})"
