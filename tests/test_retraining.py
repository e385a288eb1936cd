"""Retraining response functions (benchmark/retraining.py) against closed forms on ridge regression.

Ridge: f(θ, x) = θᵀx, ℓᵢ = ½(θᵀxᵢ − tᵢ)², objective (1/N) Σ ℓᵢ + (wd/2)‖θ‖², θˢ its exact
minimiser, A = XᵀX/N + wd I, rₘ = θˢᵀxₘ − tₘ, ε = 1/N. Removing m (objective − εℓₘ):

  exact leave-one-out  Δ = ε (A − ε xₘxₘᵀ)⁻¹ xₘ rₘ = linear / (1 − ε xₘᵀA⁻¹xₘ)   (Sherman–Morrison)
  proximal (λ)         Δ = ε (A + λI − ε xₘxₘᵀ)⁻¹ xₘ rₘ   (= the PBRF: the objective is quadratic)
  linearized PBRF      Δ = ε (A + λI)⁻¹ xₘ rₘ

The objective is strongly convex, so cold start (from θ⁰) and warm start (from θˢ) trained to
convergence must both reach the exact leave-one-out solution, and proximal → warm as λ → 0.
Full-batch gradient descent with step 1/λ_max(A) converges in a few hundred steps.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from benchmark import responses, retraining
from benchmark.ground_truth import ALL_RESPONSES, _LazyCurvature, compute_response, untrusted_rows
from benchmark.problem import Batch, FunctionalModel, Problem
from benchmark.responses import DampedGaussNewton, SolverSettings, linearized_pbrf, pbrf, pbrf_epochs
from tasks.base import Recipe

DTYPE = torch.float64


def squared_error(out, t):
    return 0.5 * (out - t).pow(2).sum(1)


class Ridge:
    def __init__(self, N: int = 40, p: int = 5, wd: float = 0.05, lam: float = 1e-3, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.X = torch.randn(N, p, generator=g, dtype=DTYPE)
        true = torch.randn(p, generator=g, dtype=DTYPE)
        self.t = self.X @ true + 0.5 * torch.randn(N, generator=g, dtype=DTYPE)
        Xq = torch.randn(6, p, generator=g, dtype=DTYPE)
        tq = Xq @ true + 0.5 * torch.randn(6, generator=g, dtype=DTYPE)
        self.N, self.wd, self.lam = N, wd, lam
        self.A = self.X.T @ self.X / N + wd * torch.eye(p, dtype=DTYPE)
        self.theta = torch.linalg.solve(self.A, self.X.T @ self.t / N)
        theta0 = torch.randn(p, generator=g, dtype=DTYPE)
        self.problem = Problem(task="ridge", scale="smoke", model=FunctionalModel(nn.Linear(p, 1, bias=False).double()),
                               params=self.theta.clone(), train=Batch(self.X, self.t[:, None]),
                               query=Batch(Xq, tq[:, None]), loss=squared_error, damping=lam, weight_decay=wd,
                               seed=0, theta0=theta0)
        eig = torch.linalg.eigvalsh(self.A)
        self.lr = float(1.0 / eig[-1])
        self.contraction = float(1 - eig[0] / eig[-1])

    def gd(self, epochs: int) -> Recipe:
        """Full-batch gradient descent (batch = N)."""
        return Recipe("sgd", epochs=epochs, batch_size=None, lr=self.lr, weight_decay=self.wd, seed=0)

    def closed_form(self, m: int, lam: float = 0.0, exact: bool = True) -> torch.Tensor:
        eps, x = 1.0 / self.N, self.X[m]
        r = x @ self.theta - self.t[m]
        M = self.A + lam * torch.eye(len(x), dtype=DTYPE) - (eps * torch.outer(x, x) if exact else 0.0)
        return eps * torch.linalg.solve(M, x * r)


def _with_damping(r: Ridge, lam: float) -> Problem:
    p = r.problem
    return Problem(task=p.task, scale=p.scale, model=p.model, params=p.params, train=p.train, query=p.query,
                   loss=p.loss, damping=lam, weight_decay=p.weight_decay, seed=p.seed, theta0=p.theta0)


REMOVED = torch.tensor([0, 7, 19, 33])


@pytest.fixture(scope="module")
def ridge() -> Ridge:
    return Ridge()


def _steps_to_converge(r: Ridge) -> int:
    return int(torch.tensor(1e-22).log() / torch.tensor(r.contraction).log()) + 1


def test_sherman_morrison_closed_form(ridge):
    r = ridge
    for m in REMOVED.tolist():
        lin = r.closed_form(m, exact=False)
        q = float(r.X[m] @ torch.linalg.solve(r.A, r.X[m])) / r.N
        torch.testing.assert_close(r.closed_form(m), lin / (1 - q), rtol=1e-12, atol=0)


@pytest.mark.parametrize("optimizer", ["sgd", "lbfgs"])
def test_cold_and_warm_reach_exact_leave_one_out(ridge, optimizer):
    r = ridge
    K = _steps_to_converge(r)
    recipe = r.gd(2 * K) if optimizer == "sgd" else Recipe("lbfgs", epochs=200, weight_decay=r.wd, seed=0)
    exact = torch.stack([r.closed_form(m) for m in REMOVED.tolist()])
    linear = torch.stack([r.closed_form(m, exact=False) for m in REMOVED.tolist()])
    deltas = {}
    for name, fn in (("cold", retraining.cold), ("warm", retraining.warm)):
        Delta, cert = fn(r.problem, REMOVED, recipe)
        deltas[name] = Delta
        torch.testing.assert_close(Delta, exact, rtol=1e-9, atol=1e-13)
        assert all(cert["converged"]), cert["relative_gradient_norm"]
        assert cert["start"] == ("theta0" if name == "cold" else "theta_s")
        # the control run (nothing removed) stays at / returns to θˢ
        assert cert["control"]["parameter_drift_norm"] < 1e-10
    torch.testing.assert_close(deltas["cold"], deltas["warm"], rtol=1e-9, atol=1e-13)
    # first order: the exact response differs from the linear one by O(ε) relative
    rel = ((deltas["cold"] - linear).norm(dim=1) / linear.norm(dim=1)).max()
    assert 0 < rel < 5 * float(r.X.pow(2).sum(1).max()) / r.N * float(1 / torch.linalg.eigvalsh(r.A)[0])


def test_linear_and_pbrf_closed_forms(ridge):
    r = ridge
    curvature = DampedGaussNewton(r.problem, r.wd + r.lam, SolverSettings())
    lin, _ = linearized_pbrf(r.problem, REMOVED, curvature)
    bregman, cert = pbrf(r.problem, REMOVED, curvature)
    for i, m in enumerate(REMOVED.tolist()):
        torch.testing.assert_close(lin[i], r.closed_form(m, lam=r.lam, exact=False), rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(bregman[i], r.closed_form(m, lam=r.lam), rtol=1e-8, atol=1e-13)
    assert all(cert["converged"])


def test_pbrf_epochs_reaches_the_pbrf_on_a_quadratic(ridge):
    """The paper's protocol (the optimizer on the PBRF objective for half the base epochs):
    long enough full-batch gradient descent reaches the PBRF's closed form; its first step is
    ε·lr·∇ℓₘ; a minibatch run ends within noise of it that shrinks with the learning rate."""
    r = ridge
    K = _steps_to_converge(r)
    Delta, cert = pbrf_epochs(r.problem, REMOVED, r.gd(2 * K))
    exact = torch.stack([r.closed_form(m, lam=r.lam) for m in REMOVED.tolist()])
    torch.testing.assert_close(Delta, exact, rtol=1e-9, atol=1e-13)
    assert cert["epochs"] == K and max(cert["relative_gradient_norm"]) < 1e-8
    assert cert["status"] == ["fixed_length"] * len(REMOVED)
    assert not untrusted_rows(cert).any()
    # a row is trusted where its run lowered J_m below J_m(θˢ) = 0, whatever its gradient
    assert list(untrusted_rows({**cert, "trusted": [True, False, True, True]})) == [False, True, False, False]
    one = Recipe("sgd", epochs=2, batch_size=8, lr=r.lr, weight_decay=r.wd, seed=0)
    g_m = r.problem.train_gradients(REMOVED)
    first, cert = pbrf_epochs(r.problem, REMOVED, dataclasses.replace(one, batch_size=r.N))
    torch.testing.assert_close(first, cert["lr"] * r.problem.epsilon * g_m, rtol=1e-12, atol=1e-16)
    # lr = 1/λ_max(A) is at half of gradient descent's stability limit 2/L, L = λ_max(A) + λ
    # (the PBRF's curvature A + λI − ε xₘxₘᵀ ≤ A + λI): the cap scales it by λ_max(A) / L
    L = float(torch.linalg.eigvalsh(r.A)[-1]) + r.lam
    assert cert["curvature_max"] == pytest.approx(L, rel=1e-3)  # 30 power iterations
    assert cert["lr_factor"] == pytest.approx((L - r.lam) / L, rel=1e-3)
    # a learning rate past the limit is scaled down to half of it
    _, cert = pbrf_epochs(r.problem, REMOVED, dataclasses.replace(one, lr=10 * r.lr, momentum=0.5))
    assert cert["lr"] == pytest.approx(0.5 * 2 * 1.5 / cert["curvature_max"], rel=1e-12)
    # minibatch noise around the PBRF's solution, proportional to the learning rate
    rel = []
    for factor in (0.3, 0.03):
        minibatch, _ = pbrf_epochs(r.problem, REMOVED, dataclasses.replace(one, epochs=2 * K, lr=factor * r.lr))
        rel.append(float(((minibatch - exact).norm(dim=1) / exact.norm(dim=1)).max()))
    assert 1e-4 < rel[1] < 0.02 and rel[0] > 3 * rel[1], rel
    with pytest.raises(ValueError, match="minibatch optimizer"):
        pbrf_epochs(r.problem, REMOVED, Recipe("lbfgs", epochs=10, weight_decay=r.wd))


def test_pbrf_epochs_certificate_does_not_depend_on_its_row_chunks(ridge, monkeypatch):
    """The certificate's full-batch J_m and ∇J_m go CERTIFICATE_ROWS removed examples at a time
    (memory): each row's numbers are its own, whatever the chunk."""
    r = ridge
    recipe = Recipe("sgd", epochs=4, batch_size=8, lr=r.lr, weight_decay=r.wd, seed=0)
    certificates = []
    for rows in (1, 3, len(REMOVED)):
        monkeypatch.setattr(responses, "CERTIFICATE_ROWS", rows)
        certificates.append(pbrf_epochs(r.problem, REMOVED, recipe)[1])
    for cert in certificates[:2]:
        for key in ("objective", "relative_gradient_norm"):
            np.testing.assert_allclose(cert[key], certificates[-1][key], rtol=1e-12, atol=1e-300)
    assert len(set(certificates[-1]["objective"])) == len(REMOVED)  # distinct rows, not one repeated


def test_proximal_equals_pbrf_and_tends_to_warm(ridge):
    r = ridge
    recipe = r.gd(2 * _steps_to_converge(r))
    Delta, cert = retraining.proximal(r.problem, REMOVED, recipe)
    assert cert["proximal_strength"] == r.lam
    exact = torch.stack([r.closed_form(m, lam=r.lam) for m in REMOVED.tolist()])
    torch.testing.assert_close(Delta, exact, rtol=1e-9, atol=1e-13)
    # λ → 0: proximal → warm (first order in λ)
    warm, _ = retraining.warm(r.problem, REMOVED, recipe)
    tiny = _with_damping(r, 1e-9)
    prox0, _ = retraining.proximal(tiny, REMOVED, recipe)
    torch.testing.assert_close(prox0, warm, rtol=1e-7, atol=1e-13)
    assert (Delta - warm).norm() > 1e-3 * warm.norm()  # λ = 1e-3 does make a difference


@pytest.mark.parametrize("batch_size,momentum", [(None, 0.0), (8, 0.9)])
@pytest.mark.parametrize("kind", ["cold", "warm", "proximal"])
def test_batched_equals_one_at_a_time(ridge, kind, batch_size, momentum):
    r = ridge
    recipe = Recipe("sgd", epochs=60, batch_size=batch_size, lr=0.3 * r.lr, momentum=momentum,
                    weight_decay=r.wd, seed=3)
    batched = retraining.retrain(r.problem, REMOVED, recipe, kind)
    for i in range(len(REMOVED)):
        single = retraining.retrain(r.problem, REMOVED[i:i + 1], recipe, kind)
        scale = batched.parameter_change(r.problem)[i].norm()
        assert (single.thetas[0] - batched.thetas[i]).abs().max() <= 1e-12 * scale
        assert (single.reference - batched.reference).abs().max() <= 1e-12 * scale


def test_lbfgs_batched_equals_one_at_a_time(ridge):
    r = ridge
    recipe = Recipe("lbfgs", epochs=200, weight_decay=r.wd, seed=0)
    batched = retraining.retrain(r.problem, REMOVED, recipe, "cold")
    for i in range(len(REMOVED)):
        single = retraining.retrain(r.problem, REMOVED[i:i + 1], recipe, "cold")
        torch.testing.assert_close(single.thetas[0], batched.thetas[i], rtol=0, atol=1e-14)


@pytest.mark.parametrize("kind", ["cold", "warm"])
def test_controlled_run_with_nothing_removed_is_exactly_zero(ridge, kind):
    """A row with nothing removed, in the same batch as the control run, gives exactly zero
    controlled scores and exactly the base outputs; the raw variant shows the drift."""
    r = ridge
    p = r.problem
    recipe = Recipe("sgd", epochs=30, batch_size=8, lr=0.3 * r.lr, momentum=0.5, weight_decay=r.wd, seed=1)
    removed = REMOVED[:3]
    W = retraining.removal_weights(p, removed)
    W[1] = 1.0  # row 1: nothing removed
    run = retraining.retrain(p, removed, recipe, kind, weights=W)
    eval_inputs = p.train.inputs[:10]
    scores, outputs = retraining.evaluations(p, run, eval_inputs, controlled=True)
    assert torch.equal(run.parameter_change(p, controlled=True)[1], torch.zeros(p.n_params, dtype=DTYPE))
    assert torch.equal(scores[:, 1], torch.zeros(len(p.query), dtype=DTYPE))
    assert torch.equal(outputs[1], p.model(p.params, eval_inputs))
    assert scores[:, 0].abs().max() > 0  # a real removal is not zero
    raw, _ = retraining.evaluations(p, run, eval_inputs, controlled=False)
    assert raw[:, 1].abs().max() > 1e-8  # minibatch SGD drifts with nothing removed


def test_mlp_rows_are_independent():
    """On a small ReLU MLP with minibatch SGD and momentum: a row's trajectory does not depend
    on the other rows of the vmapped batch, and two identical rows stay bitwise identical."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    model = FunctionalModel(module)
    X = torch.randn(30, 4, generator=g, dtype=DTYPE)
    y = torch.randint(3, (30,), generator=g)
    ce = lambda out, t: torch.nn.functional.cross_entropy(out, t, reduction="none")
    theta0 = model.flatten()
    recipe = Recipe("sgd", epochs=20, batch_size=8, lr=0.1, momentum=0.9, weight_decay=1e-2, seed=0)
    from benchmark.training import sgd
    theta = sgd(model, ce, Batch(X, y), theta0, recipe)
    p = Problem(task="mlp", scale="smoke", model=model, params=theta, train=Batch(X, y),
                query=Batch(X[:5], y[:5]), loss=ce, damping=1e-3, weight_decay=1e-2, seed=0, theta0=theta0)
    removed = torch.tensor([2, 11, 29])
    cold = retraining.retrain(p, removed, recipe, "cold")
    # with nothing removed, cold start with the same seed reproduces θˢ (up to vmap rounding)
    assert (cold.reference - theta).abs().max() < 1e-10
    W = retraining.removal_weights(p, removed)
    W[0] = 1.0
    warm = retraining.retrain(p, removed, recipe, "warm", weights=W)
    assert torch.equal(warm.thetas[0], warm.reference)
    single = retraining.retrain(p, removed[1:2], recipe, "warm")
    assert (single.thetas[0] - warm.thetas[1]).abs().max() < 1e-12


def test_compute_response_dispatch(ridge):
    """Every retraining response through the ground-truth dispatch: shapes, certificate, and
    the raw and controlled variants sharing one retraining."""
    r = ridge
    p = r.problem
    recipe = Recipe("sgd", epochs=40, batch_size=8, lr=0.3 * r.lr, weight_decay=r.wd, seed=0)
    curvature = _LazyCurvature(p, SolverSettings())
    eval_idx = torch.arange(12)
    runs: dict = {}
    out = {name: compute_response(p, name, REMOVED, eval_idx, curvature, recipe, runs)
           for name in ALL_RESPONSES}
    assert set(runs) == {"cold", "warm", "proximal"}
    for name, value in out.items():
        assert value["scores"].shape == (len(p.query), len(REMOVED))
        assert value["outputs"].shape == (len(REMOVED), len(eval_idx), 1)
        cert = value["certificate"]
        assert len(cert["parameter_change_norm"]) == len(REMOVED)
        if name in retraining.RESPONSES:
            assert len(cert["relative_gradient_norm"]) == len(REMOVED)
            assert cert["reference"] == ("theta_s" if not name.endswith("controlled") else
                                         "control run (nothing removed)")
    # raw − controlled scores = ℓ_q(θ_ref) − ℓ_q(θˢ), the same for every removed example
    diff = out["warm"]["scores"] - out["warm-controlled"]["scores"]
    torch.testing.assert_close(diff, diff[:, :1].expand_as(diff), rtol=1e-9, atol=1e-15)
    with pytest.raises(ValueError, match="recipe"):
        compute_response(p, "warm", REMOVED, eval_idx, curvature)
    with pytest.raises(KeyError, match="unknown response"):
        compute_response(p, "hot", REMOVED, eval_idx, curvature, recipe)


def test_sgd_progress_lines(mlp, monkeypatch, caplog):
    """sgd(progress=label) logs "label: epoch e/E, elapsed, estimate" once PROGRESS_EVERY seconds
    have passed (here every step: a fake clock 11 s per call); without a label it logs nothing."""
    import itertools
    import logging

    import benchmark.training as training_mod
    from benchmark.training import sgd
    from tasks.base import Recipe
    problem = mlp()
    recipe = Recipe("sgd", epochs=3, batch_size=10, lr=0.01, seed=0)  # 2 steps an epoch
    clock = itertools.count(0, 11)
    monkeypatch.setattr(training_mod.time, "perf_counter", lambda: float(next(clock)))
    with caplog.at_level(logging.INFO, logger="ifbench"):
        sgd(problem.model, problem.loss, problem.train, problem.params, recipe)
        assert not caplog.records
        sgd(problem.model, problem.loss, problem.train, problem.params, recipe, progress="toy retraining")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 6 and lines[0].startswith("toy retraining: epoch 1/3, ") and "s left" in lines[0]
    assert lines[-1].startswith("toy retraining: epoch 3/3, ") and lines[-1].endswith("about 0 s left")


def test_command_line_tools_show_progress_on_stderr(capsys):
    """show_progress (called by the decomposition, cost and perf commands) prints the "ifbench"
    progress lines on the stderr of the moment, once however often it is called."""
    import logging

    from benchmark.training import log, show_progress
    before, level = list(log.handlers), log.level
    try:
        show_progress()
        show_progress()
        log.info("toy retraining: epoch %d/%d", 1, 3)
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].endswith("] toy retraining: epoch 1/3") and len(log.handlers) == len(before) + 1
        assert log.level == logging.INFO
    finally:
        log.handlers[:] = before
        log.setLevel(level)


@pytest.mark.skipif(not (__import__("tasks.data", fromlist=["x"]).default_data_root() / "uci").exists(),
                    reason="UCI data not staged (.ci/setup stages it)")
def test_decomposition_stands_pbrf_epochs_in_for_the_pbrf(tmp_path):
    """Where the rows are scored against pbrf-epochs (the batch-norm nets' default: no PBRF
    minimiser exists there), the decomposition's PBRF is that response: its effect, its gaps and
    Table 2's PBRF column come from pbrf-epochs, and the result says so."""
    import numpy as np

    from benchmark.decomposition import decompose, task_markdown
    from benchmark.metrics import correlations, output_distance
    from benchmark.runner import Session, Settings
    from tasks.data import default_data_root
    session = Session(Settings(scale="smoke", cache_dir=tmp_path / "cache", data_root=default_data_root(),
                               ground_truth="pbrf-epochs"))
    r = decompose(session, "mlp-concrete", ["exact"])
    assert r["pbrf_response"] == "pbrf-epochs" and "pbrf-epochs" in r["certificates"]
    problem, gt, _ = session.task_state("mlp-concrete")
    epochs = gt.response("pbrf-epochs")
    keep = ~untrusted_rows(epochs["certificate"]) if untrusted_rows(epochs["certificate"]).size \
        else np.ones(len(gt.removed), dtype=bool)
    effect = output_distance(gt.base_outputs.numpy()[None], epochs["outputs"].numpy()[keep])
    np.testing.assert_allclose(r["effect"], effect, rtol=1e-12)
    exact = next(t for t in r["table2"] if t["estimator"] == "exact")
    scores = session.estimate("mlp-concrete", "exact")["scores"]
    c = correlations(scores[:, keep], epochs["scores"].numpy()[:, keep], seed=problem.seed)
    assert exact["pbrf"] == [c["pearson"], c["spearman"]]
    assert "The PBRF here is `pbrf-epochs`" in task_markdown(r, None)


def test_batch_norm_flag_matches_every_model():
    """Task.batch_norm (which keys the stable-lr retrainings) says what the model has."""
    from tasks import TASKS, get_task
    for name in TASKS:
        task = get_task(name)
        has = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in task.model("smoke").modules())
        assert task.batch_norm == has, name


def test_warm_retraining_of_a_batch_norm_net_runs_at_a_stable_lr():
    """From θˢ in eval mode, a batch-norm net's warm and proximal SGD retraining has its lr capped
    at half the heavy-ball stability limit (the certificate says by how much); cold retraining
    and nets without batch norm keep the recipe's lr; the cache key says which."""
    from benchmark.ground_truth import response_fingerprint, solver_settings
    from tasks import get_task
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).double()
    module[1].running_var.fill_(1e-4)  # frozen statistics: a sharp eval-mode net
    model = FunctionalModel(module)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, generator=g, dtype=torch.float64), torch.randn(32, 1, generator=g, dtype=torch.float64)
    sq = lambda o, t: 0.5 * (o - t).pow(2).sum(1)
    problem = Problem(task="bn", scale="smoke", model=model, params=model.flatten(), train=Batch(x, y),
                      query=Batch(x[:4], y[:4]), loss=sq, damping=1e-3, weight_decay=1e-2, seed=0,
                      theta0=model.flatten())
    recipe = Recipe("sgd", epochs=4, batch_size=8, lr=1.0, momentum=0.9, weight_decay=1e-2, seed=0)
    removed = torch.tensor([0, 5])
    warm = retraining.retrain(problem, removed, recipe, "warm")
    cert = warm.certificate
    assert cert["lr_factor"] < 1 and cert["lr"] == pytest.approx(0.5 * 2 * 1.9 / cert["curvature_max"], rel=1e-12)
    assert torch.isfinite(warm.thetas).all()
    assert "lr_factor" not in retraining.retrain(problem, removed, recipe, "cold").certificate  # the recipe's lr
    vgg, mlp = get_task("vgg13-mnist"), get_task("mlp-mnist")
    key = lambda t, r: response_fingerprint(t, "cpu", r, solver_settings(t, "cpu"))
    assert key(vgg, "warm")["stable_fraction"] == 0.5 and key(vgg, "proximal")["stable_fraction"] == 0.5
    assert "stable_fraction" not in key(vgg, "cold") and "stable_fraction" not in key(mlp, "warm")
    # cold retraining of a batch-norm net runs in train mode: its key says so, no other key changed
    assert key(vgg, "cold")["batch_norm"] == key(vgg, "cold-controlled")["batch_norm"] == "train mode"
    assert "batch_norm" not in key(vgg, "warm") and "batch_norm" not in key(mlp, "cold")


def test_a_run_that_goes_non_finite_is_rerun_at_half_the_lr(ridge):
    """sgd_halving_lr: a run that stays finite is exactly sgd's; one that goes non-finite is
    stopped and rerun from the same start at half the lr (the result is then exactly sgd's at
    that lr, and warm retraining's certificate says so); past MAX_LR_HALVINGS it raises.
    Full-batch GD on the ridge objective diverges for lr > 2/λ_max, by |1 − lr·λ_max| a step."""
    from benchmark.training import MAX_LR_HALVINGS, sgd, sgd_halving_lr
    p = ridge.problem
    run = lambda recipe: sgd_halving_lr(p.model, p.loss, p.train, p.params + 1.0, recipe, what="toy run")
    stable = ridge.gd(50)
    out, used, info = run(stable)
    assert torch.equal(out, sgd(p.model, p.loss, p.train, p.params + 1.0, stable)) and used == stable
    assert info == {"lr_halvings": 0, "diverged_at_epoch": []}
    sharp = dataclasses.replace(ridge.gd(2000), lr=3.5 * ridge.lr)  # 2.5× a step: inf from 1 after ~800 steps
    out, used, info = run(sharp)
    assert used.lr == sharp.lr / 2 and info["lr_halvings"] == 1 and 700 < info["diverged_at_epoch"][0] < 900
    assert torch.equal(out, sgd(p.model, p.loss, p.train, p.params + 1.0, used)) and torch.isfinite(out).all()
    warm = retraining.retrain(p, REMOVED, sharp, "warm")  # 1,000 epochs from θˢ, at ε-sized distance
    assert warm.certificate["lr_halvings"] == 1 and warm.certificate["lr"] == sharp.lr / 2
    assert warm.certificate["lr_factor"] == 0.5 and torch.isfinite(warm.thetas).all()
    hopeless = dataclasses.replace(ridge.gd(300), lr=1000 * ridge.lr)  # still 124× a step after 3 halvings
    with pytest.raises(FloatingPointError, match="toy run diverged .* every learning rate tried"):
        run(hopeless)
    assert MAX_LR_HALVINGS == 3


def test_cold_retraining_of_a_batch_norm_net_repeats_its_base_training(tmp_path):
    """A batch-norm net's cold retraining runs as its base training ran (train mode, from θ⁰ and
    the initial statistics): the control run reproduces θˢ and its running statistics exactly,
    a removed row is the base training on the other examples only (checked against a training
    on the data without it, same batch order), and each row is scored with its own statistics."""
    from benchmark.cache import Cache
    from benchmark.ground_truth import build_problem
    from benchmark.training import train_mode_minibatch
    from test_models import _TinyBNTask  # tests/ is on sys.path (pytest prepends it); the repo root is not under `pytest`
    task = _TinyBNTask()
    problem = build_problem(task, "smoke", tmp_path, Cache(tmp_path))
    recipe = task.recipe("smoke")
    removed = torch.tensor([2, 7])
    run = retraining.retrain(problem, removed, recipe, "cold")
    assert run.certificate["batch_norm"].startswith("train mode")
    assert torch.equal(run.reference, problem.params)
    for k, b in problem.model.buffers.items():
        assert torch.equal(run.buffers[-1][k], b), k
    # row 0 by hand: the same loop with example 2's weight 0
    w = torch.ones(problem.n_train, dtype=problem.dtype)
    w[2] = 0
    theta, buf = train_mode_minibatch(problem.model, problem.loss, problem.train, problem.theta0, recipe,
                                      weights=w, buffers=problem.model.initial_buffers())
    torch.testing.assert_close(run.thetas[0], theta, rtol=0, atol=0)
    assert not torch.equal(run.thetas[0], run.thetas[1])
    assert not torch.equal(buf["bn.running_mean"], problem.model.buffers["bn.running_mean"])
    # scored with its own statistics: ℓ_q(θ₋ₘ, its stats) − ℓ_q(θˢ, θˢ's stats)
    scores, outputs = retraining.evaluations(problem, run, problem.train.inputs[:4], controlled=False)
    q = problem.query
    own = problem.loss(problem.model(run.thetas[0], q.inputs, run.buffers[0]), q.targets)
    base = problem.loss(problem.model(problem.params, q.inputs), q.targets)
    torch.testing.assert_close(scores[:, 0], own - base, rtol=1e-12, atol=1e-14)
    frozen_stats = problem.loss(problem.model(run.thetas[0], q.inputs), q.targets) - base
    assert not torch.allclose(scores[:, 0], frozen_stats)
    torch.testing.assert_close(outputs[0], problem.model(run.thetas[0], problem.train.inputs[:4], run.buffers[0]))
    # the certificate's gradient is that of each row's own eval-mode objective
    _, g = retraining.objective_gradients(problem, run.thetas[:1], retraining.removal_weights(problem, removed[:1], False),
                                          recipe.weight_decay, buffers=run.buffers[:1])
    assert run.certificate["gradient_norm"][0] == pytest.approx(float(g.norm()), rel=1e-10)
