"""The second, independent PBRF solve (benchmark/second_solve.py) and the ground truth's error bar.

Least squares f(θ, x) = θᵀx, ℓᵢ = ½(θᵀxᵢ − tᵢ)², A = XᵀX/N + wd I, rₘ = θˢᵀxₘ − tₘ, ε = 1/N: the
PBRF objective is quadratic and its minimiser has the closed form

  Δₘ = ε (A + λI − ε xₘxₘᵀ)⁻¹ xₘ rₘ

(stationarity: (XᵀX/N + (wd+λ)I) Δ − ε xₘ (rₘ + xₘᵀΔ) = 0), which both solves must reproduce.
"""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from benchmark import ground_truth as gt_mod
from benchmark import leaderboard
from benchmark.cache import Cache
from benchmark.ground_truth import SECOND_SOLVE, _LazyCurvature, compute_response, compute_second_solve
from benchmark.responses import DampedGaussNewton, SolverSettings, pbrf
from benchmark.runner import ground_truth_summary
from benchmark.second_solve import PRECONDITIONED, SecondSolveSettings, disagreement, error_bar_text, second_pbrf, tie_margin
from estimators.checks import linear_problem, mlp_problem, removed_examples
from tasks.base import GroundTruthConfig, Recipe, ScaleConfig, Splits, Task

DTYPE = torch.float64
TOL = 1e-8


def closed_form_pbrf(lp, m: int) -> torch.Tensor:
    p = lp.problem
    x = lp.X[m]
    r = x @ lp.theta - lp.t[m]
    d = len(x)
    M = lp.X.T @ lp.X / p.n_train + (p.weight_decay + p.damping) * torch.eye(d, dtype=DTYPE) \
        - p.epsilon * torch.outer(x, x)
    return p.epsilon * torch.linalg.solve(M, x * r)


def test_least_squares_matches_the_closed_form_and_the_first_solve():
    lp = linear_problem(n_train=60, weight_decay=0.05)
    p = lp.problem
    removed = torch.tensor([3, 17, 42, 59])
    Delta, cert = second_pbrf(p, removed, TOL)
    assert cert["status"] == ["converged"] * 4 and max(cert["relative_gradient_norm"]) <= TOL
    closed = torch.stack([closed_form_pbrf(lp, m) for m in removed.tolist()])
    rel = lambda a, b: float(((a - b).norm(dim=1) / b.norm(dim=1)).max())
    assert rel(Delta, closed) < 1e-8
    assert cert["start_max_relative_residual"] < 1e-6 and min(cert["iterations"]) > 1
    first, _ = pbrf(p, removed, DampedGaussNewton(p, p.weight_decay + p.damping, SolverSettings()))
    assert rel(Delta, first) < 1e-8


def test_preconditioned_least_squares_converges_in_a_few_iterations():
    """H₀ = (A + μI)⁻¹ on a quadratic whose Hessian is A + μI − ε xₘxₘᵀ (a rank-one change):
    L-BFGS reaches the closed form in a few iterations, where H₀ = γI needs many more."""
    lp = linear_problem(n_train=60, weight_decay=0.05)
    p = lp.problem
    removed = torch.tensor([3, 17, 42, 59])
    solve = DampedGaussNewton(p, p.weight_decay + p.damping, SolverSettings()).approximate_solve()
    plain, plain_cert = second_pbrf(p, removed, TOL)
    Delta, cert = second_pbrf(p, removed, TOL, precondition=solve)
    closed = torch.stack([closed_form_pbrf(lp, m) for m in removed.tolist()])
    assert cert["status"] == ["converged"] * 4 and "(G + μI)⁻¹" in cert["method"]
    assert float(((Delta - closed).norm(dim=1) / closed.norm(dim=1)).max()) < 1e-8
    assert max(cert["iterations"]) <= 3 < min(plain_cert["iterations"])


def test_linear_start_is_not_the_answer():
    """The L-BFGS start is the linearized PBRF, which differs from the PBRF by the ε xxᵀ term."""
    lp = linear_problem(n_train=60, weight_decay=0.05)
    p = lp.problem
    m = 17
    Delta, cert = second_pbrf(p, torch.tensor([m]), TOL, SecondSolveSettings(max_iterations=0))
    closed = closed_form_pbrf(lp, m)
    assert cert["status"] == ["max_iterations"]
    assert float((Delta[0] - closed).norm() / closed.norm()) > 1e-3


@pytest.fixture(scope="module")
def mlp():
    """A tanh MLP (smooth: both solves converge), the first solve of 6 removed examples and the
    second solve of 4 of them."""
    problem = mlp_problem(train_steps=60)
    removed = removed_examples(problem, 6)
    eval_idx = torch.arange(8)
    curvature = _LazyCurvature(problem, SolverSettings())
    first = compute_response(problem, "pbrf", removed, eval_idx, curvature)
    check = compute_second_solve(problem, removed, eval_idx, first, k=4, seed=5, tol=TOL)
    return problem, removed, first, check


def test_two_solves_agree_on_a_smooth_mlp(mlp):
    problem, removed, first, check = mlp
    s = check["summary"]
    assert check["scores"].shape == (len(problem.query), 4) and check["outputs"].shape[0] == 4
    assert check["removed"].tolist() == removed[check["positions"]].tolist()
    assert check["certificate"]["status"] == ["converged"] * 4
    assert s["n"] == s["n_trusted"] == 4
    assert s["ceiling"] > 0.99 and s["ceiling_ci"][0] > 0.9
    # where both met the certificate they agree to ~1e-8; the one example whose first solve
    # stopped early (max_steps, ‖∇J‖ 4e-5 · ε‖∇ℓₘ‖) is the largest disagreement, still small
    both = np.array(first["certificate"]["converged"])[check["positions"].numpy()]
    rel = np.array(s["relative_error"])
    assert 0 < rel[both].max() < 1e-6 and not both.all()
    assert rel.max() == s["max_relative_error"] == rel[~both].max() < 1e-3


def test_preconditioned_second_solve_finds_the_same_minimiser_with_fewer_evaluations(mlp):
    """H₀ = (G + μI)⁻¹ changes L-BFGS's path, not the point its certificate accepts."""
    problem, removed, first, check = mlp
    subset = check["removed"]
    curvature = DampedGaussNewton(problem, problem.weight_decay + problem.damping, SolverSettings())
    plain, plain_cert = second_pbrf(problem, subset, TOL)
    Delta, cert = second_pbrf(problem, subset, TOL, PRECONDITIONED, precondition=curvature.approximate_solve())
    assert cert["status"] == plain_cert["status"] == ["converged"] * 4
    assert float(((Delta - plain).norm(dim=1) / plain.norm(dim=1)).max()) < 1e-6
    assert sum(cert["evaluations"]) < 0.5 * sum(plain_cert["evaluations"])


def test_a_perturbed_first_solve_shows_up(mlp):
    problem, removed, first, check = mlp
    positions = check["positions"].numpy()
    s1 = first["scores"][:, positions].numpy().copy()
    s2 = check["scores"].numpy()
    trusted = np.ones(4, dtype=bool)
    s1[:, 1] *= 1.1  # one removed example 10 % off
    d = disagreement(s1, s2, trusted)
    assert d["max_relative_error"] == pytest.approx(0.1 / 1.1, rel=1e-4)
    assert int(np.argmax(d["relative_error"])) == 1 and d["median_relative_error"] < 1e-4
    s1[:, 2] *= -1.0  # one with the wrong sign: the ceiling falls
    d = disagreement(s1, s2, trusted)
    assert d["max_relative_error"] == pytest.approx(2.0, rel=1e-4)
    assert d["ceiling"] < 0.99
    # only examples trusted by both count; with fewer than 3 there is no ceiling
    d = disagreement(s1, s2, np.array([True, False, False, True]))
    assert d["max_relative_error"] < 0.1 and d["ceiling"] is None and d["n_trusted"] == 2


class _TanhTask(Task):
    """A synthetic regression task (no dataset) whose ground truth, second solve included, is
    computed through load_ground_truth and its cache."""

    name = "tiny-tanh"
    version = 1

    def __init__(self, n_second_solve=None, **ground_truth):
        self.n_second_solve, self.ground_truth_options = n_second_solve, ground_truth

    def config(self, scale):
        return ScaleConfig(recipe=Recipe("lbfgs", epochs=40, weight_decay=0.05, seed=0),
                           ground_truth=GroundTruthConfig(n_removed=6, n_query=4, n_eval=8,
                                                          n_second_solve=self.n_second_solve,
                                                          **self.ground_truth_options))

    def data(self, scale, data_root):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(50, 3, generator=g, dtype=DTYPE)
        y = torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(50, 1, generator=g, dtype=DTYPE)
        return Splits(x[:40], y[:40], x[40:], y[40:])

    def model(self, scale):
        return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))

    def loss(self, outputs, targets):
        return 0.5 * (outputs - targets).pow(2).sum(1)


def test_ground_truth_carries_the_second_solve(tmp_path):
    task = _TanhTask()
    cache = Cache(tmp_path)
    problem = gt_mod.build_problem(task, "smoke", tmp_path, cache)
    gt, cached = gt_mod.load_ground_truth(task, "smoke", problem, cache)
    assert not cached and SECOND_SOLVE in gt.responses and f"{SECOND_SOLVE}:" in gt.key
    check = gt.responses[SECOND_SOLVE]
    assert len(check["positions"]) == gt_mod.N_SECOND_SOLVE["smoke"] == 4
    torch.testing.assert_close(check["removed"], gt.removed[check["positions"]])
    summary = ground_truth_summary(gt, "pbrf")["second_solve"]
    assert summary["ceiling"] > 0.99 and summary["converged_fraction"] == 1.0
    assert "second_solve" not in ground_truth_summary(gt, "linear")
    json.dumps(summary)  # goes into every row's JSON
    # cached: the same entry again
    again, cached = gt_mod.load_ground_truth(task, "smoke", problem, cache)
    assert cached and again.responses[SECOND_SOLVE]["summary"] == check["summary"]
    # n_second_solve = 0: none
    none, _ = gt_mod.load_ground_truth(_TanhTask(0), "smoke", problem, Cache(tmp_path / "other"))
    assert SECOND_SOLVE not in none.responses and "second_solve" not in ground_truth_summary(none, "pbrf")


def test_cache_keys():
    task = _TanhTask()
    settings = gt_mod.solver_settings(task, "smoke")
    fp = gt_mod.response_fingerprint(task, "smoke", "pbrf", settings)
    assert "n_second_solve" not in fp["ground_truth"] and "second_solve" not in fp  # old keys unchanged
    check = gt_mod.response_fingerprint(task, "smoke", SECOND_SOLVE, settings)
    assert check["second_solve"]["n"] == 4 and check["second_solve"]["first"] == gt_mod.content_key(fp)
    other = gt_mod.response_fingerprint(_TanhTask(2), "smoke", SECOND_SOLVE, settings)
    assert other["second_solve"]["n"] == 2 and gt_mod.content_key(other) != gt_mod.content_key(check)
    # a preconditioned second solve: its own key, every other response's unchanged
    pre = _TanhTask(second_solve_preconditioned=True)
    for name in ("pbrf", "linear", "cold"):
        assert gt_mod.response_fingerprint(pre, "smoke", name, settings) == \
            gt_mod.response_fingerprint(task, "smoke", name, settings)
    assert gt_mod.content_key(gt_mod.response_fingerprint(pre, "smoke", SECOND_SOLVE, settings)) != \
        gt_mod.content_key(check)


def test_preconditioned_second_solve_through_the_ground_truth(tmp_path):
    """The option reaches the solve (its certificate names the method), and without a dense G
    or a Nyström preconditioner it is refused with a message naming the fix."""
    task = _TanhTask(second_solve_preconditioned=True)
    cache = Cache(tmp_path)
    problem = gt_mod.build_problem(task, "smoke", tmp_path, cache)
    gt, _ = gt_mod.load_ground_truth(task, "smoke", problem, cache)
    check = gt.responses[SECOND_SOLVE]
    assert "(G + μI)⁻¹" in check["certificate"]["method"] and check["summary"]["ceiling"] > 0.99
    cg_only = _TanhTask(second_solve_preconditioned=True, dense_max_params=0)
    with pytest.raises(ValueError, match="dense_max_params.*nystrom_rank"):
        gt_mod.load_ground_truth(cg_only, "smoke", problem, Cache(tmp_path / "cg"))


# ---- the leaderboard: error bar and ties ------------------------------------------------------

def _row(est, pearson, second):
    cert = {"key": "pbrf:aaa", "converged_fraction": 1.0, "median_relative_gradient_norm": 1e-9,
            "max_relative_gradient_norm": 2e-9, "tolerance": 1e-8, "status_counts": {"converged": 4},
            **({"second_solve": second} if second else {})}
    return {"task": "mlp-concrete", "estimator": est, "scale": "cpu", "ground_truth": "pbrf", "status": "ok",
            "error": None, "pearson": pearson, "pearson_ci": [pearson - 0.01, pearson + 0.005], "spearman": pearson,
            "spearman_ci": [pearson - 0.01, pearson], "seconds": 1.0, "evaluations": 10, "n_removed": 10,
            "n_query": 5, "ground_truth_certificate": cert,
            "provenance": {"commit": "abc", "torch": "2", "device": "cpu", "threads": 1, "seed": 0,
                           "date": "2026-01-01T00:00:00+00:00"}}


SECOND = {"n": 8, "n_trusted": 7, "relative_error": [0.01] * 8, "median_relative_error": 0.023,
          "max_relative_error": 0.2, "ceiling": 0.988, "ceiling_ci": [0.95, 0.998], "method": "L-BFGS",
          "converged_fraction": 0.5, "max_relative_gradient_norm": 1e-3,
          "status_counts": {"converged": 4, "stalled": 4}, "seconds": 1.0}


def _page(tmp_path, second):
    results = tmp_path / "results"
    (results / "cpu").mkdir(parents=True)
    for est, p in (("exact", 0.99), ("cg", 0.95), ("lissa", 0.939), ("grad-dot", 0.90)):
        (results / "cpu" / f"mlp-concrete__{est}__pbrf.json").write_text(json.dumps(_row(est, p, second)))
    page, table, _ = leaderboard.write(results, tmp_path / "lb", figures=False)
    return page.read_text(), {r["estimator"]: r for r in csv.DictReader(open(table))}


def test_leaderboard_marks_rows_within_the_ceiling_as_tied(tmp_path):
    assert tie_margin(SECOND) == pytest.approx(0.05) and tie_margin(None) == 0.0
    text, csv_rows = _page(tmp_path, SECOND)
    # best − row ≤ 1 − ceiling_lo = 0.05: cg (0.04 below) tied, lissa (0.051) and grad-dot not
    assert "**0.990**" in text and "≈ **0.950**" in text
    assert "**0.939**" not in text and "**0.900**" not in text
    assert {k: v["tied_with_best"] for k, v in csv_rows.items()} == \
        {"exact": "best", "cg": "tied", "lissa": "", "grad-dot": ""}
    assert csv_rows["cg"]["gt_ceiling"] == "0.988" and csv_rows["cg"]["gt_ceiling_ci_low"] == "0.95"
    # the error bar in the ground-truth table, and the rule in the page's text
    assert error_bar_text(SECOND) in text
    assert "median 2.3 % / max 20 % rel. err., ceiling P 0.988 [0.95, 1.00]" in text
    assert "| 7/8: converged 4, stalled 4 |" in text
    assert "best − row ≤ 1 − ceiling_lo" in text


def test_without_a_ceiling_only_equal_numbers_tie(tmp_path):
    text, csv_rows = _page(tmp_path, None)
    assert "**0.990**" in text and "≈" not in text.split("How the numbers")[0] + text.split("## cpu")[1]
    assert [k for k, v in csv_rows.items() if v["tied_with_best"]] == ["exact"]


def test_decomposition_page_shows_the_error_bar():
    from benchmark import decomposition as dec
    r = {"task": "mlp-concrete", "n_train": 100, "n_params": 31, "n_removed": 4, "n_trusted": 4, "n_eval": 10,
         "n_query": 5, "effect": [1.0] * 4, "gaps": [{"gap": "linearization error", "between": "pbrf / linear",
                                                       "d": [0.1] * 4}],
         "drift": [], "table2": [],
         "certificates": {"pbrf": {"seconds": 1.0, "converged": 0.75, "median_rel_grad": 1e-9, "length": [3, 5]},
                          "pbrf (second solve)": {"seconds": 2.0, "converged": 0.5, "median_rel_grad": 1e-4,
                                                  "length": [40, 90]}}}
    text = dec.task_markdown({**r, "second_solve": SECOND}, None)
    assert "Ground-truth error bar: the PBRF of 8 of the removed examples solved a second time (L-BFGS; 7 trusted" \
        in text
    assert error_bar_text(SECOND) in text and "| pbrf (second solve) |" in text
    assert "Ground-truth error bar" not in dec.task_markdown(r, None)
