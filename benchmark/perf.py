"""Speed benchmark of the ground-truth engine: the problem's operators and the PBRF solve.

    python -m benchmark.perf --task mlp-mnist --scale cpu [--removed R] [--threads 1] [--operators-only]
                             [--preconditioner-dtype float32|float64] [--gauss-newton-dtype float32|float64]

Operators (over the N training examples, best of --repeats): forward, per-example gradients,
one Gauss–Newton–vector product and the dense Gauss–Newton matrix, each also as a ratio to
one plain forward + backward of the module over the N examples (ordinary autograd on the
summed loss, the cheapest way to get a full-batch gradient).
PBRF (skipped with --operators-only): the solve batched over R removed examples (default: the
task's own R at that scale, the batch its ground truth is solved in) vs one after another, seconds per removed example (also in full-batch gradients), and how close each comes
to the machine's matrix-multiply floor: the time the solve's counted model evaluations would
take at the matmul throughput measured here (a 2048×2048 product in the problem's dtype), with
the cost model gradient = 3, Gauss–Newton–vector product = 5, Hessian–vector product = 7
forward passes per example and vector, and a forward pass's flops counted by torch's
FlopCounterMode (2d for an MLP; a convolution reuses its weights at every position, so a CNN's
forward pass costs many times 2d; with float32 Gauss–Newton products the floor stays the
problem dtype's). Numbers are machine-dependent; the ratios are what to compare.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import torch

from tasks import get_task
from tasks.data import default_data_root

from .cache import Cache
from .ground_truth import build_problem, seeded_choice, solver_settings
from .problem import Problem
from .responses import ground_truth_curvature, pbrf
from .training import show_progress

FORWARDS_PER_EVALUATION = {"forward": 1, "gradient": 3, "gnvp": 5, "hvp": 7}  # per example and vector


def matmul_gflops(dtype: torch.dtype, device: str, n: int = 2048, repeats: int = 5) -> float:
    """The best throughput of `repeats` n×n products (on a shared machine the mean would
    understate the floor and so overstate every fraction of it)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    return 2 * n ** 3 / best_seconds(lambda: a @ a, repeats, device) / 1e9


def model_flops(counts: dict, forward_flops: float) -> float:
    """Flops of the counted evaluations (kind -> examples × vectors) at forward_flops a forward."""
    return sum(FORWARDS_PER_EVALUATION.get(k, 0) * v for k, v in counts.items()) * forward_flops


def best_seconds(fn: Callable[[], object], repeats: int, device: str) -> float:
    """The least wall time of `repeats` calls of fn (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def forward_backward(problem: Problem) -> None:
    """One plain autograd forward + backward of the module over the training set (summed loss),
    chunked like the operators; θ from problem.params, gradients left in the module."""
    module = problem.model.module
    problem.model.load(problem.params)
    module.zero_grad(set_to_none=True)
    for c in problem._chunks(problem.train):
        problem.loss(module(c.inputs), c.targets).sum().backward()


def operators(problem: Problem, repeats: int, device: str) -> dict:
    """Seconds of each operator over the training set and its ratio to forward + backward."""
    train = problem.train
    v = torch.randn(1, problem.n_params, dtype=problem.dtype, device=problem.device)
    fb = best_seconds(lambda: forward_backward(problem), repeats, device)
    seconds = {
        "forward_backward": fb,
        "forward": best_seconds(lambda: problem.outputs(train.inputs), repeats, device),
        "gradients": best_seconds(lambda: problem.gradients(train), repeats, device),
        "gnvp": best_seconds(lambda: problem.gnvp(v), repeats, device),
        "gnvp_8_vectors": best_seconds(lambda: problem.gnvp(v.expand(8, -1)), repeats, device),
    }
    return {"seconds": seconds, "ratio_to_forward_backward": {k: s / fb for k, s in seconds.items()}}


def run(task_name: str, scale: str, n_removed: int | None, data_root: Path, cache_dir: Path | None, device: str,
        repeats: int = 3, operators_only: bool = False, preconditioner_dtype: str | None = None,
        gauss_newton_dtype: str | None = None) -> dict:
    task = get_task(task_name)
    problem = build_problem(task, scale, data_root, Cache(cache_dir), device)
    result = {"task": task_name, "scale": scale, "n_params": problem.n_params, "n_train": problem.n_train,
              "device": device, "threads": torch.get_num_threads(),
              "matmul_gflops": matmul_gflops(problem.dtype, device),
              "forward_flops_per_example": problem.forward_flops()}
    result["forward_flops_per_example_in_2d"] = result["forward_flops_per_example"] / (2 * problem.n_params)
    result["operators"] = operators(problem, repeats, device)
    forwards = {"forward": 1, "forward_backward": 3, "gradients": 3, "gnvp": 5, "gnvp_8_vectors": 40}
    result["operators"]["fraction_of_matmul_floor"] = {
        k: forwards[k] * problem.n_train * result["forward_flops_per_example"] / 1e9 / result["matmul_gflops"] / s
        for k, s in result["operators"]["seconds"].items()}
    settings = solver_settings(task, scale)
    for field, dtype in (("preconditioner_dtype", preconditioner_dtype), ("gauss_newton_dtype", gauss_newton_dtype)):
        if dtype is not None:  # "float64": the problem's own dtype, no lowered copy
            settings = dataclasses.replace(settings, **{field: None if dtype == "float64" else dtype})
    start = time.perf_counter()
    curvature = ground_truth_curvature(problem, settings)
    result["curvature_setup_seconds"] = time.perf_counter() - start
    result["curvature_method"] = curvature.method
    for field in ("preconditioner_dtype", "gauss_newton_dtype"):
        result[field] = getattr(settings, field) or str(problem.dtype).removeprefix("torch.")
    if operators_only:
        return result
    n_removed = n_removed or task.ground_truth_config(scale).n_removed
    removed = seeded_choice(problem.n_train, n_removed, seed=task.recipe(scale).seed + 2).to(problem.device)
    peak, fb = result["matmul_gflops"], result["operators"]["seconds"]["forward_backward"]

    def timed(rows: list[torch.Tensor]) -> tuple[float, float, dict, list]:
        problem.counter.reset()
        start = time.perf_counter()
        solved = [pbrf(problem, r, curvature) for r in rows]
        seconds = time.perf_counter() - start
        counts = dict(problem.counter.counts)
        return seconds, model_flops(counts, result["forward_flops_per_example"]), counts, solved

    batched_s, batched_flops, batched_counts, ((batched, certificate),) = timed([removed])
    seq_s, seq_flops, _, seq = timed([removed[i:i + 1] for i in range(len(removed))])
    agreement = float((batched - torch.cat([s[0] for s in seq])).norm() / batched.norm())
    result.update({
        "n_removed": len(removed),
        "batched_seconds": batched_s, "sequential_seconds": seq_s, "speedup": seq_s / batched_s,
        "batched_seconds_per_removed": batched_s / len(removed),
        "batched_seconds_per_removed_in_forward_backward": batched_s / len(removed) / fb,
        "batched_evaluations_per_removed": {k: v / len(removed) for k, v in batched_counts.items()},
        "batched_fraction_of_matmul_floor": batched_flops / 1e9 / peak / batched_s,
        "sequential_fraction_of_matmul_floor": seq_flops / 1e9 / peak / seq_s,
        "relative_difference_batched_vs_sequential": agreement,
        "pbrf_status": certificate["status"], "pbrf_steps": certificate["steps"],
        "pbrf_inner_iterations": certificate["inner_iterations"],
    })
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="mlp-mnist")
    parser.add_argument("--scale", default="cpu")
    parser.add_argument("--removed", type=int, default=None,
                        help="removed examples solved together (default: the task's R at this scale)")
    parser.add_argument("--repeats", type=int, default=3, help="operator timings: best of this many calls")
    parser.add_argument("--operators-only", action="store_true", help="skip the (slow) PBRF solves")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--preconditioner-dtype", default=None, choices=["float32", "float64"],
                        help="the dense factor in the PBRF solve's preconditioner (default: the task's "
                             "GroundTruthConfig.preconditioner_dtype, else the problem's dtype)")
    parser.add_argument("--gauss-newton-dtype", default=None, choices=["float32", "float64"],
                        help="the Gauss-Newton products of the PBRF solve's inner CG (default: the task's "
                             "GroundTruthConfig.gauss_newton_dtype, else the problem's dtype)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    show_progress()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.task, args.scale, args.removed, args.data_root or default_data_root(), args.cache_dir,
                 args.device, repeats=args.repeats, operators_only=args.operators_only,
                 preconditioner_dtype=args.preconditioner_dtype, gauss_newton_dtype=args.gauss_newton_dtype)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
