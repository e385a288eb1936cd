"""benchmark.perf's cost model: a forward pass's flops counted, not assumed to be 2d."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmark import perf
from benchmark.problem import Batch, FunctionalModel, Problem
from tasks.data import default_data_root


def test_forward_flops_of_an_mlp_are_twice_its_weights(mlp):
    problem = mlp((5, 4, 4, 3), "tanh")
    assert problem.forward_flops() == 2 * (5 * 4 + 4 * 4 + 4 * 3)  # biases are not products


def test_forward_flops_of_a_convolution_count_every_position():
    """A 3×3 convolution on 6×6 inputs applies its 18 weights at 16 positions: 576 flops plus
    the linear head's 192, where 2d (d = 119 parameters) would say 238."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    model = FunctionalModel(module)
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(3, (4,))
    problem = Problem(task="conv", scale="smoke", model=model, params=model.flatten(), train=Batch(x, y),
                      query=Batch(x, y), loss=lambda o, t: nn.functional.cross_entropy(o, t, reduction="none"),
                      damping=1e-3, weight_decay=0.0, seed=0)
    assert problem.n_params == 119
    assert problem.forward_flops() == 2 * 16 * 2 * 9 + 2 * 32 * 3


def test_model_flops_weights_each_kind_by_its_forward_passes():
    assert perf.model_flops({"forward": 2, "gradient": 1, "gnvp": 3, "unknown": 100}, 10.0) == (2 + 3 + 15) * 10.0


@pytest.mark.skipif(not (default_data_root() / "uci").exists(), reason="UCI data not staged (.ci/setup stages it)")
def test_perf_run_end_to_end(tmp_path):
    """The whole report on the smallest task: batched and one-at-a-time solves agree, and no
    fraction of the matmul floor exceeds 1 (a cost model that overcounts would)."""
    torch.set_num_threads(1)
    result = perf.run("lr-cancer", "smoke", 3, default_data_root(), tmp_path, "cpu", repeats=1)
    assert result["n_removed"] == 3 and result["curvature_method"] == "dense"
    assert result["relative_difference_batched_vs_sequential"] < 1e-6
    assert result["forward_flops_per_example_in_2d"] == pytest.approx(1.0, abs=0.05)
    fractions = [result["batched_fraction_of_matmul_floor"], result["sequential_fraction_of_matmul_floor"],
                 *result["operators"]["fraction_of_matmul_floor"].values()]
    assert all(0 < f <= 1 for f in fractions), fractions
    assert set(result["batched_evaluations_per_removed"]) >= {"gradient", "gnvp"}


@pytest.mark.skipif(not (default_data_root() / "mnist").exists(), reason="MNIST not staged (.ci/setup stages it)")
def test_perf_measures_the_ground_truths_own_solver(tmp_path):
    """perf (and cost) build the curvature solver the ground truth uses: for ae-mnist its
    Nyström-preconditioned CG (GroundTruthConfig.nystrom_rank), not the dense G it replaced."""
    torch.set_num_threads(1)
    result = perf.run("ae-mnist", "smoke", 1, default_data_root(), tmp_path, "cpu", repeats=1, operators_only=True)
    assert result["curvature_method"] == "pcg (rank-400 Nyström, float32 products)"
