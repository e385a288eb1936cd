"""Speed benchmark of the PBRF solve: batched over removed examples vs one after another.

    python -m benchmark.perf --task mlp-mnist --scale cpu --removed 8 [--repeats 1]

Reports both wall times, their ratio, and how close each comes to the machine's
matrix-multiply floor: the time the solve's counted model evaluations would take if they ran at
the float matmul throughput measured here (a 2048×2048 product), with the cost model
forward = 2d, gradient = 6d, Gauss–Newton–vector product = 10d flops per example and vector.
Numbers are machine-dependent; the ratios are what to compare across machines.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tasks import get_task
from tasks.data import default_data_root

from .cache import Cache
from .ground_truth import build_problem, seeded_choice, solver_settings
from .responses import DampedGaussNewton, pbrf

FLOPS_PER_EVALUATION = {"forward": 2, "gradient": 6, "gnvp": 10, "hvp": 14}  # × d


def matmul_gflops(dtype: torch.dtype, device: str, n: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(n, n, dtype=dtype, device=device)
    a @ a
    start = time.perf_counter()
    for _ in range(repeats):
        a @ a
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e9


def model_flops(counts: dict, d: int) -> float:
    return sum(FLOPS_PER_EVALUATION.get(k, 0) * v for k, v in counts.items()) * d


def run(task_name: str, scale: str, n_removed: int, data_root: Path, cache_dir: Path | None, device: str) -> dict:
    task = get_task(task_name)
    problem = build_problem(task, scale, data_root, Cache(cache_dir), device)
    settings = solver_settings(task, scale)
    start = time.perf_counter()
    curvature = DampedGaussNewton(problem, problem.weight_decay + problem.damping, settings)
    setup = time.perf_counter() - start
    removed = seeded_choice(problem.n_train, n_removed, seed=task.recipe(scale).seed + 2).to(problem.device)
    peak = matmul_gflops(problem.dtype, device)

    def timed(rows: list[torch.Tensor]) -> tuple[float, float, list]:
        problem.counter.reset()
        start = time.perf_counter()
        deltas = [pbrf(problem, r, curvature)[0] for r in rows]
        seconds = time.perf_counter() - start
        return seconds, model_flops(problem.counter.counts, problem.n_params), deltas

    batched_s, batched_flops, (batched,) = timed([removed])
    seq_s, seq_flops, seq = timed([removed[i:i + 1] for i in range(len(removed))])
    agreement = float((batched - torch.cat(seq)).norm() / batched.norm())
    return {
        "task": task_name, "scale": scale, "n_removed": n_removed, "n_params": problem.n_params,
        "n_train": problem.n_train, "device": device, "threads": torch.get_num_threads(),
        "curvature_setup_seconds": setup,
        "batched_seconds": batched_s, "sequential_seconds": seq_s, "speedup": seq_s / batched_s,
        "matmul_gflops": peak,
        "batched_fraction_of_matmul_floor": batched_flops / 1e9 / peak / batched_s,
        "sequential_fraction_of_matmul_floor": seq_flops / 1e9 / peak / seq_s,
        "relative_difference_batched_vs_sequential": agreement,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="mlp-mnist")
    parser.add_argument("--scale", default="cpu")
    parser.add_argument("--removed", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(args.task, args.scale, args.removed, args.data_root or default_data_root(), args.cache_dir,
                 args.device)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
