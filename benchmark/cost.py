"""What a task's ground truth costs at a scale, measured: the numbers that say whether it fits.

    python -m benchmark.cost --scale cpu --task lenet-mnist [--task ...] [--max-seconds 240]

For each task: the base training (its own certificate's seconds, or now if not cached), one
call of each model operator over the N training examples (forward, per-example gradients,
Gauss–Newton–vector product: one vector), the damped Gauss–Newton setup (dense G and its
Cholesky factor where d ≤ dense_max_params, else nothing), and one PBRF solve for the first
removed example of the ground truth, stopped after --max-seconds (then reported as a lower
bound). The ground truth of the scale needs R such solves (batched, about 1.5× faster than
one after another on the CPU; see benchmark.perf) after the setup, so

    projected seconds ≈ setup + R × (one PBRF solve)

is what one removed example at a time would cost. The default LiSSA's cost is projected from
one of its steps, measured: depth × (one Gauss–Newton product of R vectors over a minibatch of
min(batch, N) examples; many vectors on a CNN go through the Jacobians, Problem.gnvp_sum, so R
products of one vector would overstate it), with the depth
its rule picks for the problem (`lissa_depth`), or, where its full-batch closed form applies
(batch ≥ N, estimators/lissa.py), the measured seconds of its fit, which does that work. Each task's
numbers go to
<results-dir>/<scale>/cost/<task>.json; `python -m benchmark.leaderboard` lists them for the
tasks that have no leaderboard rows at that scale.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
import traceback
from pathlib import Path

import torch

from estimators import make_estimator
from tasks import SCALES, TASKS, get_task

from .cache import Cache, TaskResultFiles
from .ground_truth import build_problem, seeded_choice, solver_settings
from .problem import TimeBudgetExceeded
from .responses import ground_truth_curvature, pbrf
from .runner import REPO, git_commit
from .training import show_progress


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_task(task_name: str, scale: str, data_root: Path | None, cache_dir: Path | None, device: str = "cpu",
                 max_seconds: float = 240.0) -> dict:
    """The cost of one task's ground truth at `scale` (seconds; see the module docstring)."""
    from tasks.data import default_data_root
    task = get_task(task_name)
    started = time.perf_counter()
    problem = build_problem(task, scale, Path(data_root) if data_root else default_data_root(), Cache(cache_dir),
                            device)
    build_seconds = time.perf_counter() - started
    cfg = task.ground_truth_config(scale)
    settings = solver_settings(task, scale)
    removed = seeded_choice(problem.n_train, cfg.n_removed, seed=task.recipe(scale).seed + 2).to(problem.device)
    vector = torch.randn(1, problem.n_params, dtype=problem.dtype, device=problem.device,
                         generator=torch.Generator(device=problem.device).manual_seed(0))
    out = {
        "task": task_name, "scale": scale, "n_train": problem.n_train, "n_params": problem.n_params,
        "n_removed": cfg.n_removed, "n_query": cfg.n_query, "dense": problem.n_params <= settings.dense_max_params,
        "training_seconds": problem.training_certificate.get("seconds"), "build_seconds": build_seconds,
        "forward_seconds": _timed(lambda: problem.outputs(problem.train.inputs)),
        "gradients_seconds": _timed(lambda: problem.gradients(problem.train)),
        "gnvp_seconds": _timed(lambda: problem.gnvp(vector)),
        "max_seconds": max_seconds,
        "provenance": {"commit": git_commit(), "torch": torch.__version__, "device": device,
                       "threads": torch.get_num_threads(),
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
    }
    problem.counter.deadline = time.monotonic() + max_seconds
    try:
        start = time.perf_counter()
        curvature = ground_truth_curvature(problem, settings)
        out["setup_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        _, certificate = pbrf(problem, removed[:1], curvature)
        out.update(pbrf_seconds=time.perf_counter() - start, pbrf_finished=True, pbrf_status=certificate["status"][0],
                   pbrf_steps=certificate["steps"][0])
    except TimeBudgetExceeded:
        out.setdefault("setup_seconds", None)
        out.update(pbrf_seconds=None, pbrf_finished=False)
    finally:
        problem.counter.deadline = None
    out["seconds_spent"] = time.perf_counter() - started
    start = time.perf_counter()
    lissa = make_estimator("lissa").fit(problem)  # its default depth depends on the problem (20 products)
    out["lissa_depth"], out["lissa_closed_form"] = lissa.depth_, lissa.eigh_ is not None
    if out["lissa_closed_form"]:
        out["lissa_projected_seconds"] = time.perf_counter() - start
    else:
        rows = torch.arange(min(lissa.batch_size, problem.n_train), device=problem.device)
        step = vector.expand(cfg.n_removed, -1).clone()
        problem.gnvp(step, rows=rows)  # warm-up: the model's flops, the kept Jacobians (as LiSSA's)
        out["lissa_step_seconds"] = _timed(lambda: problem.gnvp(step, rows=rows))
        out["lissa_projected_seconds"] = lissa.depth_ * out["lissa_step_seconds"]
    if out["setup_seconds"] is not None and out["pbrf_seconds"] is not None:
        out["projected_ground_truth_seconds"] = out["setup_seconds"] + cfg.n_removed * out["pbrf_seconds"]
    else:
        out["projected_ground_truth_seconds"] = None
    return out


#: <results>/<scale>/cost/<task>.json
RESULTS = TaskResultFiles("cost", ("task", "scale", "n_params", "provenance"))
write_result, load_results = RESULTS.write, RESULTS.load


def ground_truth_seconds(r: dict) -> tuple[float, bool]:
    """(projected ground-truth seconds, exact) of a cost result: setup + R × one PBRF solve, or
    where the solve was stopped the lower bound setup + R × (the time it ran)."""
    if r.get("projected_ground_truth_seconds") is not None:
        return r["projected_ground_truth_seconds"], True
    setup = r.get("setup_seconds") or 0.0
    ran = max(r["max_seconds"] - setup, 0.0) if r.get("setup_seconds") is not None else 0.0
    return max(setup + r["n_removed"] * ran, r["max_seconds"]), False


def _s(x) -> str:
    if x is None:
        return "–"
    return f"{x:.2g} s" if x < 10 else f"{x:.0f} s" if x < 600 else f"{x / 60:.0f} min"


def cost_table(results: list[dict]) -> str:
    """Markdown table of cost results (one line per task)."""
    lines = ["| task | N | d | solve | base training | forward / gradients / GNVP over N | setup | "
             "one PBRF solve | R | projected ground truth | LiSSA (projected) |", "| --- " * 11 + "|"]
    for r in results:
        pbrf_cell = (f"{_s(r['pbrf_seconds'])} ({r['pbrf_status']}, {r['pbrf_steps']} steps)" if r.get("pbrf_finished")
                     else f"> {_s(r['max_seconds'] - (r.get('setup_seconds') or 0))} (stopped)"
                     if r.get("setup_seconds") is not None else "not reached")
        setup = _s(r["setup_seconds"]) if r.get("setup_seconds") is not None else f"> {_s(r['max_seconds'])} (stopped)"
        seconds, exact = ground_truth_seconds(r)
        projected = _s(seconds) if exact else f"> {_s(seconds)}"
        lines.append(f"| {r['task']} | {r['n_train']:,} | {r['n_params']:,} | {'dense' if r['dense'] else 'CG'} | "
                     f"{_s(r['training_seconds'])} | {r['forward_seconds']:.2f} / {r['gradients_seconds']:.2f} / "
                     f"{r['gnvp_seconds']:.2f} s | {setup} | {pbrf_cell} | {r['n_removed']} | {projected} | "
                     f"{_s(r.get('lissa_projected_seconds'))} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmark.cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", default="cpu", choices=SCALES)
    ap.add_argument("--task", action="append", required=True, choices=list(TASKS), help="repeatable")
    ap.add_argument("--max-seconds", type=float, default=240.0,
                    help="stop the setup + one PBRF solve after this long (default 240)")
    ap.add_argument("--data-root", type=Path, default=None)
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--results-dir", type=Path, default=REPO / "leaderboard" / "results")
    args = ap.parse_args(argv)
    show_progress()
    if args.max_seconds <= 0:
        ap.error(f"--max-seconds: expected a positive number, got {args.max_seconds}")
    failures = 0
    for name in args.task:
        print(f"[cost] {name} ({args.scale})", flush=True)
        try:
            r = measure_task(name, args.scale, args.data_root, args.cache_dir, args.device, args.max_seconds)
            print(f"[cost] wrote {write_result(r, args.results_dir)}", flush=True)
            print(cost_table([r]), flush=True)
        except Exception:
            failures += 1
            traceback.print_exc()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
