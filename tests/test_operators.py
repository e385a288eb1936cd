"""The Problem's operators against dense matrices built independently, and batched CG.

The reference model is a hand-written forward pass over the flat parameter vector (nn.Linear
order: weight then bias, layer by layer), differentiated with torch.autograd.functional; the
Gauss–Newton matrix is (1/N) Σᵢ Jᵢᵀ (diag(pᵢ) − pᵢpᵢᵀ) Jᵢ with pᵢ = softmax(f(θ, xᵢ)).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import hessian, jacobian

from benchmark.linalg import CholeskySolver, KernelSolver, add_gram_, batched_cg, relative_residual
from benchmark.problem import Batch, EvaluationCounter, Problem, output_hessians, psd_sqrt

SIZES = (5, 4, 4, 3)
N = 20


def forward(theta: torch.Tensor, x: torch.Tensor, activation: str, sizes=SIZES) -> torch.Tensor:
    act = {"tanh": torch.tanh, "relu": torch.relu}[activation]
    h, pos = x, 0
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        W = theta[pos:pos + a * b].reshape(b, a)
        pos += a * b
        c = theta[pos:pos + b]
        pos += b
        h = h @ W.T + c
        if i < len(sizes) - 2:
            h = act(h)
    assert pos == theta.numel()
    return h


def dense_gauss_newton(theta, X, activation) -> torch.Tensor:
    d = theta.numel()
    G = torch.zeros(d, d, dtype=theta.dtype)
    for x in X:
        J = jacobian(lambda th: forward(th, x[None], activation)[0], theta)  # (C, d)
        p = torch.softmax(forward(theta, x[None], activation)[0], -1)
        H = torch.diag(p) - torch.outer(p, p)
        G += J.T @ H @ J
    return G / len(X)


def mean_loss_hessian(theta, X, y, activation) -> torch.Tensor:
    return hessian(lambda th: F.cross_entropy(forward(th, X, activation), y), theta, vectorize=True)


@pytest.fixture(scope="module", params=["tanh", "relu"])
def activation(request):
    return request.param


@pytest.fixture(params=[1024, 7], ids=["one-chunk", "chunks-of-7"])
def problem(request, mlp, activation):
    return mlp(SIZES, activation, n_train=N, chunk_size=request.param, train_steps=5)


@pytest.fixture(scope="module")
def reference(mlp, activation):
    """Dense G and Hessian of the mean loss over the training set, built once per activation."""
    p = mlp(SIZES, activation, n_train=N, train_steps=5)
    X, y = p.train.inputs, p.train.targets
    return {"G": dense_gauss_newton(p.params, X, activation), "H": mean_loss_hessian(p.params, X, y, activation)}


def vectors(d: int, k: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(k, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_forward_matches_reference(problem, activation):
    theta, X = problem.params, problem.train.inputs
    torch.testing.assert_close(problem.outputs(X), forward(theta, X, activation), rtol=1e-13, atol=1e-13)
    assert problem.n_params == 5 * 4 + 4 + 4 * 4 + 4 + 4 * 3 + 3
    torch.testing.assert_close(problem.losses(problem.train),
                               F.cross_entropy(forward(theta, X, activation), problem.train.targets,
                                               reduction="none"), rtol=1e-13, atol=1e-13)


def test_gnvp_matches_dense(problem, reference):
    G = reference["G"]
    V = vectors(problem.n_params, k=4)
    torch.testing.assert_close(problem.gnvp(V), V @ G, rtol=1e-10, atol=1e-12)
    # one vector of shape (d,) is a stack of one
    torch.testing.assert_close(problem.gnvp(V[0]), (V[:1] @ G), rtol=1e-10, atol=1e-12)
    # damped product adds (wd + λ) V
    mu = problem.weight_decay + problem.damping
    torch.testing.assert_close(problem.damped_gnvp(V), V @ G + mu * V, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(problem.damped_gnvp(V, damping=0.5), V @ G + (problem.weight_decay + 0.5) * V,
                               rtol=1e-10, atol=1e-12)


def test_gauss_newton_matrix_matches_dense(problem, reference):
    G = reference["G"]
    Gp = problem.gauss_newton_matrix()
    torch.testing.assert_close(Gp, G, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(Gp, Gp.T, rtol=0, atol=1e-14)
    assert float(torch.linalg.eigvalsh(Gp).min()) > -1e-12  # PSD


def test_gnvp_at_other_params(problem, activation):
    """params= evaluates G at another θ (used by response functions)."""
    other = problem.params + 0.1 * vectors(problem.n_params, k=1, seed=5)[0]
    G = dense_gauss_newton(other, problem.train.inputs, activation)
    V = vectors(problem.n_params, k=3)
    torch.testing.assert_close(problem.gnvp(V, params=other), V @ G, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(problem.gauss_newton_matrix(params=other), G, rtol=1e-10, atol=1e-12)


def test_minibatch_gnvp_averages_over_batch(problem, activation):
    idx = torch.tensor([1, 4, 5, 11, 17])
    batch = problem.train.subset(idx)
    G_B = dense_gauss_newton(problem.params, batch.inputs, activation)
    V = vectors(problem.n_params, k=3)
    torch.testing.assert_close(problem.gnvp(V, batch=batch), V @ G_B, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(problem.gauss_newton_matrix(batch=batch), G_B, rtol=1e-10, atol=1e-12)
    # the full-batch G is the average of the single-example ones
    singles = sum(problem.gnvp(V, batch=problem.train.subset(torch.tensor([i]))) for i in range(N)) / N
    torch.testing.assert_close(singles, problem.gnvp(V), rtol=1e-10, atol=1e-12)


def test_hvp_matches_autograd_hessian(problem, activation, reference):
    H = reference["H"]
    V = vectors(problem.n_params, k=4)
    torch.testing.assert_close(problem.hvp(V), V @ H, rtol=1e-10, atol=1e-12)
    idx = torch.tensor([0, 2, 3, 19])
    b = problem.train.subset(idx)
    H_B = mean_loss_hessian(problem.params, b.inputs, b.targets, activation)
    torch.testing.assert_close(problem.hvp(V, batch=b), V @ H_B, rtol=1e-10, atol=1e-12)


def test_gradients_match_autograd(problem, activation):
    theta = problem.params
    expected = []
    for x, y in zip(problem.train.inputs, problem.train.targets):
        th = theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(forward(th, x[None], activation), y[None]), th)
        expected.append(g)
    expected = torch.stack(expected)
    torch.testing.assert_close(problem.gradients(problem.train), expected, rtol=1e-12, atol=1e-13)
    idx = torch.tensor([3, 8, 0])
    torch.testing.assert_close(problem.train_gradients(idx), expected[idx], rtol=1e-12, atol=1e-13)
    # params= evaluates at another θ
    other = theta + 0.1
    th = other.clone().requires_grad_(True)
    x, y = problem.train.inputs[4], problem.train.targets[4]
    (g4,) = torch.autograd.grad(F.cross_entropy(forward(th, x[None], activation), y[None]), th)
    torch.testing.assert_close(problem.gradients(problem.train, params=other)[4], g4, rtol=1e-12, atol=1e-13)


def test_operators_do_not_change_params(problem):
    before = problem.params.clone()
    V = vectors(problem.n_params, k=2)
    problem.gnvp(V), problem.hvp(V), problem.gradients(problem.train), problem.gauss_newton_matrix()
    assert torch.equal(problem.params, before)


def test_evaluation_counter(mlp):
    problem = mlp(SIZES, "tanh", n_train=N)
    c = problem.counter
    assert c.total == 0
    d, k = problem.n_params, 3
    V = vectors(d, k=k)
    problem.outputs(problem.train.inputs[:4])
    assert c.counts["forward"] == 4
    problem.losses(problem.query)
    assert c.counts["forward"] == 4 + len(problem.query)
    problem.gradients(problem.train)
    assert c.counts["gradient"] == N
    problem.train_gradients(torch.tensor([1, 2]))
    assert c.counts["gradient"] == N + 2
    problem.gnvp(V)
    assert c.counts["gnvp"] == N * k
    problem.gnvp(V, batch=problem.train.subset(torch.arange(5)))
    assert c.counts["gnvp"] == N * k + 5 * k
    problem.damped_gnvp(V)
    assert c.counts["gnvp"] == 2 * N * k + 5 * k
    problem.hvp(V)
    assert c.counts["hvp"] == N * k
    problem.gauss_newton_matrix()
    assert c.counts["gnvp"] == 2 * N * k + 5 * k + N * d  # d products' worth
    assert c.total == sum(c.counts.values())
    assert c.as_dict()["total"] == c.total
    c.reset()
    assert c.total == 0 and c.as_dict() == {"total": 0}


def test_counter_standalone():
    c = EvaluationCounter()
    c.add("gnvp", 3)
    c.add("gnvp", 2.0)
    c.add("forward", 1)
    assert c.as_dict() == {"total": 6, "forward": 1, "gnvp": 5}


def test_batch_subset_and_len():
    b = Batch(torch.arange(10.0)[:, None], torch.arange(10))
    assert len(b) == 10
    s = b.subset(torch.tensor([2, 5]))
    assert len(s) == 2 and s.targets.tolist() == [2, 5]


# ---------------------------------------------------------------- batched CG


def random_spd(d: int, cond: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    w = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), d, dtype=torch.float64)
    D = torch.diag(torch.rand(d, generator=g, dtype=torch.float64) * 3 + 0.5)  # uneven diagonal
    A = Q @ torch.diag(w) @ Q.T
    return D @ A @ D


@pytest.fixture
def spd():
    d = 30
    A = random_spd(d, cond=1e3)
    B = torch.randn(5, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return A, B


@pytest.mark.parametrize("preconditioned", [False, True], ids=["plain", "jacobi"])
def test_batched_cg_solves(spd, preconditioned):
    A, B = spd
    matvec = lambda X: X @ A
    precondition = (lambda V: V / torch.diagonal(A)) if preconditioned else None
    X, info = batched_cg(matvec, B, rtol=1e-12, maxiter=500, precondition=precondition)
    expected = torch.linalg.solve(A, B.T).T
    torch.testing.assert_close(X, expected, rtol=1e-8, atol=1e-10)
    assert info.converged
    assert info.relative_residual.shape == (5,)
    true_res = torch.linalg.vector_norm(B - X @ A, dim=-1) / torch.linalg.vector_norm(B, dim=-1)
    torch.testing.assert_close(info.relative_residual, true_res, rtol=1e-6, atol=1e-18)
    assert float(info.relative_residual.max()) <= 1e-11
    d = info.as_dict()
    assert d["method"] == "cg" and d["converged"] is True and d["iterations"] == info.iterations
    assert d["max_relative_residual"] == pytest.approx(float(true_res.max()), rel=1e-6)


def test_jacobi_preconditioner_helps(spd):
    A, B = spd
    _, plain = batched_cg(lambda X: X @ A, B, rtol=1e-10, maxiter=1000)
    _, jac = batched_cg(lambda X: X @ A, B, rtol=1e-10, maxiter=1000, precondition=lambda V: V / torch.diagonal(A))
    assert jac.iterations < plain.iterations


@pytest.mark.parametrize("preconditioned", [False, True], ids=["plain", "jacobi"])
def test_batched_cg_truncated_reports_true_residual(spd, preconditioned):
    A, B = spd
    precondition = (lambda V: V / torch.diagonal(A)) if preconditioned else None
    X, info = batched_cg(lambda X: X @ A, B, rtol=1e-12, maxiter=4, precondition=precondition)
    assert info.iterations == 4
    assert not info.converged
    true_res = torch.linalg.vector_norm(B - X @ A, dim=-1) / torch.linalg.vector_norm(B, dim=-1)
    assert float(true_res.min()) > 1e-6  # really not solved
    torch.testing.assert_close(info.relative_residual, true_res, rtol=1e-10, atol=0)
    torch.testing.assert_close(relative_residual(lambda X: X @ A, X, B), true_res, rtol=1e-12, atol=0)


def test_batched_cg_warm_start_and_rows_independent(spd):
    A, B = spd
    expected = torch.linalg.solve(A, B.T).T
    # a row that is already solved (warm start) or zero stays put; the others are solved
    X0 = torch.zeros_like(B)
    X0[0] = expected[0]
    B2 = B.clone()
    B2[1] = 0
    X, info = batched_cg(lambda X: X @ A, B2, rtol=1e-12, maxiter=500, X0=X0)
    torch.testing.assert_close(X[0], expected[0], rtol=1e-8, atol=1e-10)
    assert torch.equal(X[1], torch.zeros_like(X[1]))
    torch.testing.assert_close(X[2:], expected[2:], rtol=1e-8, atol=1e-10)
    assert info.converged
    # solving rows together gives the same result as one at a time
    Xs = torch.cat([batched_cg(lambda X: X @ A, B[i:i + 1], rtol=1e-12, maxiter=500)[0] for i in range(5)])
    Xb, _ = batched_cg(lambda X: X @ A, B, rtol=1e-12, maxiter=500)
    torch.testing.assert_close(Xb, Xs, rtol=1e-9, atol=1e-11)


def test_batched_cg_per_row_operators_compute_only_unconverged_rows():
    """per_row: row r is solved with its own matrix A_r (and preconditioner); each row's
    answer is that of its own system, and a row stops costing products once it converges."""
    d, k = 40, 4
    As = torch.stack([random_spd(d, cond=10.0 ** (1 + r)) for r in range(k)])  # row 0 easiest
    B = torch.randn(k, d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    seen = []

    def matvec(V, rows):
        seen.append(rows.clone())
        return torch.einsum("rde,re->rd", As[rows], V)

    jacobi = lambda V, rows: V / torch.diagonal(As[rows], dim1=1, dim2=2)
    X, info = batched_cg(matvec, B, rtol=1e-12, maxiter=500, precondition=jacobi, per_row=True)
    expected = torch.linalg.solve(As, B.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(X, expected, rtol=1e-8, atol=1e-10)
    assert info.converged and float(info.relative_residual.max()) <= 1e-11
    sizes = [len(r) for r in seen[:-1]]  # the last call is the true-residual check, all rows
    assert sizes[0] == k and sizes[-1] < k and sizes == sorted(sizes, reverse=True)
    assert len(seen[-1]) == k


def test_cholesky_solver(spd):
    A, B = spd
    solver = CholeskySolver(A)
    X, info = solver.solve_with_info(B)
    torch.testing.assert_close(X, torch.linalg.solve(A, B.T).T, rtol=1e-9, atol=1e-11)
    assert info.method == "dense" and float(info.relative_residual.max()) < 1e-12
    with pytest.raises(torch.linalg.LinAlgError, match="not positive definite"):
        CholeskySolver(-A)


def test_gauss_newton_rows_factor_g(problem, reference):
    """G = FᵀF / N for the rows F (at most N·C of them; the softmax's null direction left out)."""
    F_rows = problem.gauss_newton_rows()
    assert F_rows.shape[1] == problem.n_params and len(F_rows) <= N * SIZES[-1]
    torch.testing.assert_close(F_rows.T @ F_rows / N, reference["G"], rtol=1e-10, atol=1e-12)


def test_kernel_solver_is_the_dense_solve(problem, reference):
    """Woodbury on the N·C-row kernel solves (G + μI) X = B as the dense Cholesky does."""
    mu = 0.05
    A = reference["G"] + mu * torch.eye(problem.n_params, dtype=torch.float64)
    B = vectors(problem.n_params, k=3)
    solver = KernelSolver(problem.gauss_newton_rows(), N, mu)
    X, info = solver.solve_with_info(B)
    torch.testing.assert_close(X, CholeskySolver(A).solve(B), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(solver.matvec(X), B, rtol=1e-9, atol=1e-11)
    assert info.method == "kernel" and float(info.relative_residual.max()) < 1e-12
    low = solver.lowered(torch.float32)
    assert low.F.dtype == torch.float32 and low.solve(B).dtype == torch.float64
    assert float((low.solve(B) - X).norm() / X.norm()) < 1e-4


def test_damped_gauss_newton_takes_the_cheaper_direct_solve(mlp):
    """N·C < d: the kernel solve, with the dense solve's answer; otherwise the dense Cholesky."""
    from benchmark.responses import DampedGaussNewton, SolverSettings
    few = mlp(SIZES, "tanh", n_train=8, train_steps=5)  # N·C = 24 rows against d = 59
    kernel = DampedGaussNewton(few, 0.05, SolverSettings())
    assert kernel.method == "kernel"
    A = few.gauss_newton_matrix() + 0.05 * torch.eye(few.n_params, dtype=torch.float64)
    B = vectors(few.n_params, k=2)
    torch.testing.assert_close(kernel.solve(B)[0], torch.linalg.solve(A, B.T).T, rtol=1e-9, atol=1e-11)
    assert DampedGaussNewton(mlp(SIZES, "tanh", n_train=N, train_steps=5), 0.05, SolverSettings()).method == "dense"
    assert KernelSolver.cheaper(3000, 6442)  # mlp-mnist at smoke
    assert not KernelSolver.cheaper(10000, 13002) and not KernelSolver.cheaper(10000, 3550)  # mlp-mnist, lenet at cpu


@pytest.mark.parametrize("block", [1, 4, 7, 100])
def test_add_gram_lower_triangle_mirrored(block):
    """add_gram_ accumulates Aᵀ A over calls (lower block triangle mirrored), exactly symmetric."""
    g = torch.Generator().manual_seed(3)
    A1, A2 = (torch.randn(n, 23, dtype=torch.float64, generator=g) for n in (9, 30))
    G = torch.zeros(23, 23, dtype=torch.float64)
    add_gram_(G, A1, block)
    add_gram_(G, A2, block)
    torch.testing.assert_close(G, A1.T @ A1 + A2.T @ A2, rtol=1e-13, atol=1e-13)
    assert torch.equal(G, G.T)


def test_psd_sqrt_drops_only_the_null_directions():
    """Softmax cross-entropy Hessians diag(p) − ppᵀ have rank C − 1: drop_null keeps C − 1
    columns and R Rᵀ = H; a PSD batch of full rank keeps every column."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 5, dtype=torch.float64, generator=g)
    H = output_hessians(lambda y, t: F.cross_entropy(y, t, reduction="none"), logits, torch.arange(6) % 5)
    R = psd_sqrt(H, drop_null=True)
    assert R.shape == (6, 5, 4)
    torch.testing.assert_close(R @ R.transpose(1, 2), H, rtol=1e-12, atol=1e-15)
    # the null eigenvalue as eigh returns it on some CPU (±a few C·eps·max): still dropped
    ones = torch.full((5, 5), 0.2, dtype=torch.float64)  # the projector on 1/√5
    top = torch.linalg.eigvalsh(H).amax(-1)[:, None, None]
    for sign in (1, -1):
        noisy = H + sign * 50 * 5 * torch.finfo(torch.float64).eps * top * ones
        assert psd_sqrt(noisy, drop_null=True).shape == (6, 5, 4)
    M = torch.randn(6, 5, 5, dtype=torch.float64, generator=g)
    full = M @ M.transpose(1, 2)
    assert psd_sqrt(full, drop_null=True).shape == (6, 5, 5)
    torch.testing.assert_close(psd_sqrt(full, drop_null=True), psd_sqrt(full))


def test_gauss_newton_matrix_blocked_gram(problem, reference, monkeypatch):
    """The dense G is the same when its Gram product runs in column blocks smaller than d."""
    import benchmark.linalg as linalg
    monkeypatch.setattr(linalg.add_gram_, "__defaults__", (5,))
    torch.testing.assert_close(problem.gauss_newton_matrix(), reference["G"], rtol=1e-10, atol=1e-12)


def test_gauss_newton_matrix_in_memory_bounded_chunks(problem, reference, monkeypatch):
    """With the Jacobian budget below one chunk's n·C·d numbers, G is accumulated over smaller
    chunks of examples (down to one at a time) and stays the same."""
    seen = []
    real = Problem._chunks
    monkeypatch.setattr(Problem, "_chunks", lambda self, batch, size=None: seen.append(size) or real(self, batch, size))
    C = problem.outputs(problem.train.inputs[:1]).numel()
    for budget, rows in ((3 * C * problem.n_params, 3), (1, 1)):
        seen.clear()
        monkeypatch.setattr(Problem, "JACOBIAN_MAX_NUMBERS", budget)
        torch.testing.assert_close(problem.gauss_newton_matrix(), reference["G"], rtol=1e-10, atol=1e-12)
        assert seen == [rows]


def test_gauss_newton_matrix_reports_progress_of_a_long_build(problem, monkeypatch, caplog):
    """A build taking more than 10 s between chunks logs examples done, elapsed and remaining
    time on the "ifbench" logger (shown live by the pytest plugin); a quick one stays silent."""
    import itertools
    import logging
    import benchmark.problem as problem_mod
    monkeypatch.setattr(Problem, "JACOBIAN_MAX_NUMBERS", 1)  # one example per chunk
    with caplog.at_level(logging.INFO, logger="ifbench"):
        problem.gauss_newton_matrix()
        assert not caplog.records
        clock = itertools.count(0, 11)  # every call of the clock: 11 s later
        monkeypatch.setattr(problem_mod.time, "perf_counter", lambda: float(next(clock)))
        problem.gauss_newton_matrix()
    lines = [r.getMessage() for r in caplog.records]
    assert lines and all("dense Gauss-Newton matrix" in m and "s left" in m for m in lines)
    assert f"1/{problem.n_train} examples" in lines[0]


def test_pbrf_objective_recomputes_base_outputs_when_too_large(mlp, monkeypatch):
    """Above STORE_BASE_OUTPUTS_MAX numbers the PBRF objective recomputes f(θˢ, x) per chunk
    instead of storing it (a language model's logits): the same values and gradients."""
    from benchmark.responses import PBRFObjective
    problem = mlp((5, 4, 3), "tanh", n_train=20, chunk_size=7, train_steps=5)
    removed = torch.tensor([2, 11])
    Delta = 1e-2 * torch.randn(2, problem.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    stored = PBRFObjective(problem, removed, mu=0.01)
    monkeypatch.setattr(PBRFObjective, "STORE_BASE_OUTPUTS_MAX", 0)
    recomputed = PBRFObjective(problem, removed, mu=0.01)
    assert stored.stored and not recomputed.stored and not hasattr(recomputed, "base_outputs")
    for a, b in zip(stored.value_and_gradient(Delta), recomputed.value_and_gradient(Delta)):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


class _BatchNormNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 4)
        self.bn = torch.nn.BatchNorm1d(4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.bn(self.fc(x))))


def _batch_norm_problem():
    """A Problem whose nn.Module holds neither θˢ nor the frozen running statistics."""
    from benchmark.problem import FunctionalModel, Problem
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = FunctionalModel(_BatchNormNet().double())
    # the functional model's frozen statistics (what the operators use), not the module's own
    model.buffers = {**model.buffers, "bn.running_mean": torch.linspace(-1, 1, 4, dtype=torch.float64),
                     "bn.running_var": torch.linspace(0.5, 2, 4, dtype=torch.float64)}
    theta = torch.randn(model.n_params, generator=g, dtype=torch.float64)
    X, y = torch.randn(10, 3, generator=g, dtype=torch.float64), torch.randint(2, (10,), generator=g)
    return Problem(task="bn", scale="smoke", model=model, params=theta, train=Batch(X, y), query=Batch(X[:2], y[:2]),
                   loss=lambda o, t: F.cross_entropy(o, t, reduction="none"), damping=1e-3, weight_decay=0.0, seed=0)


def test_module_is_a_private_copy_at_the_base_parameters():
    from estimators.checks import problem_changes, problem_state
    p = _batch_norm_problem()
    state = problem_state(p)
    m = p.module()
    assert not m.training and all(q.requires_grad for q in m.parameters())
    assert torch.equal(torch.cat([q.detach().reshape(-1) for q in m.parameters()]), p.params)
    assert all(torch.equal(b, p.model.buffers[k]) for k, b in m.named_buffers())
    with torch.no_grad():
        torch.testing.assert_close(m(p.train.inputs), p.outputs(p.train.inputs), rtol=1e-14, atol=0)
    m.train()(p.train.inputs).sum().backward()  # updates the copy's running statistics and grads
    with torch.no_grad():
        for q in m.parameters():
            q.add_(1.0)
    assert problem_changes(p, state) == []
    assert not m.bn.running_mean.equal(p.model.buffers["bn.running_mean"])
    assert p.module().bn.running_mean.equal(p.model.buffers["bn.running_mean"])  # a fresh copy each call


def test_train_loader_in_order_and_seeded_shuffle():
    p = _batch_norm_problem()
    batches = list(p.train_loader(4))
    assert [len(x) for x, _ in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([x for x, _ in batches]), p.train.inputs)
    assert torch.equal(torch.cat([t for _, t in batches]), p.train.targets)
    order = lambda seed: torch.cat([x for x, _ in p.train_loader(3, shuffle=True, seed=seed)])
    assert torch.equal(order(1), order(1)) and not torch.equal(order(1), order(2))
    assert not torch.equal(order(1), p.train.inputs)
    assert torch.equal(order(1)[:, 0].sort().values, p.train.inputs[:, 0].sort().values)
    # iterating it leaves torch's global random state alone (the harness flags rows that change it)
    state = torch.random.get_rng_state()
    list(p.train_loader(4)), list(p.train_loader(4, shuffle=True))
    assert torch.equal(torch.random.get_rng_state(), state)


def _conv_problem(n: int = 12, chunk_size: int = 1024) -> Problem:
    """A small ReLU CNN classifier (a forward pass costs 10× 2d flops, as the CNN tasks' do)."""
    from benchmark.problem import FunctionalModel
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Conv2d(3, 3, 3),
                                 torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(3 * 6 * 6, 3)).double()
    model = FunctionalModel(module)
    x, y = torch.randn(n, 1, 10, 10, generator=g, dtype=torch.float64), torch.randint(3, (n,), generator=g)
    return Problem(task="conv", scale="smoke", model=model, params=model.flatten(), train=Batch(x, y),
                   query=Batch(x[:2], y[:2]), loss=lambda o, t: F.cross_entropy(o, t, reduction="none"),
                   damping=1e-3, weight_decay=1e-2, seed=0, chunk_size=chunk_size)


def test_products_by_jacobians_only_for_many_vectors_on_a_cnn(mlp):
    conv = _conv_problem()
    assert conv.forward_flops() > 10 * 2 * conv.n_params
    assert conv.products_by_jacobians(40) and not conv.products_by_jacobians(3)  # C = 3 outputs
    assert not mlp(SIZES, "tanh", n_train=N).products_by_jacobians(40)  # an MLP's passes cost 2d
    before = dict(conv.counter.counts)
    conv.products_by_jacobians(40)
    assert dict(conv.counter.counts) == before  # the rule evaluates nothing that counts


@pytest.mark.parametrize("budget", [None, 2 * 3 * 441], ids=["one-chunk", "chunks-of-2"])  # C = 3, d = 441
def test_gnvp_by_jacobians_is_the_vector_product(monkeypatch, budget):
    """Many vectors on a CNN go through the Jacobians: the same G V (and minibatch, other θ)."""
    if budget is not None:
        monkeypatch.setattr(Problem, "JACOBIAN_MAX_NUMBERS", budget)
    conv = _conv_problem()
    V = vectors(conv.n_params, k=40)
    theta = conv.params + 0.1 * V[0] / V[0].norm()
    assert conv.products_by_jacobians(len(V))
    by_jacobians = [conv.gnvp(V), conv.gnvp(V, batch=conv.train.subset(torch.arange(5))), conv.gnvp(V, params=theta)]
    monkeypatch.setattr(Problem, "products_by_jacobians", lambda self, k: False)
    monkeypatch.setattr(Problem, "stored_products", lambda self, k: False)
    by_vectors = [conv.gnvp(V), conv.gnvp(V, batch=conv.train.subset(torch.arange(5))), conv.gnvp(V, params=theta)]
    for a, b in zip(by_jacobians, by_vectors):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13 * float(b.abs().max()))


def test_training_set_jacobians_kept_for_repeated_products(monkeypatch):
    """CG's products (training set, θˢ, many vectors) reuse the Jacobians of the first one: the
    same G V as by vectors; above STORE_JACOBIANS_MAX nothing is kept; a lowered copy keeps its own."""
    conv = _conv_problem()
    V = vectors(conv.n_params, k=40)
    first = conv.gnvp(V)
    kept = conv._train_jacobians
    assert kept[0].shape == (conv.n_train, 3, conv.n_params)
    torch.testing.assert_close(conv.gnvp(2 * V), 2 * first, rtol=1e-13, atol=0)
    assert conv._train_jacobians is kept
    assert conv.lowered(torch.float32)._train_jacobians is None
    monkeypatch.setattr(Problem, "STORE_JACOBIANS_MAX", 0)
    unkept = _conv_problem()
    torch.testing.assert_close(unkept.gnvp(V), first, rtol=1e-12, atol=0)
    assert unkept._train_jacobians is None
    monkeypatch.setattr(Problem, "products_by_jacobians", lambda self, k: False)
    monkeypatch.setattr(Problem, "stored_products", lambda self, k: False)
    by_vectors = _conv_problem().gnvp(V)
    torch.testing.assert_close(first, by_vectors, rtol=1e-11, atol=1e-13 * float(by_vectors.abs().max()))


def test_a_cnn_keeps_its_jacobians_for_few_vectors_too(monkeypatch, mlp):
    """On a network that reuses its weights (F ≥ 4d) products at θˢ over the training set go
    through the kept Jacobians even where the flop rule computing them afresh says no (k ≤ C):
    the same G V. An MLP keeps none."""
    conv = _conv_problem()
    V = vectors(conv.n_params, k=3)
    assert conv.stored_products(3) and not conv.products_by_jacobians(3)
    kept = conv.gnvp(V)
    assert conv._train_jacobians is not None
    small_mlp = mlp(SIZES, "tanh", n_train=N)
    assert not small_mlp.stored_products(40)
    small_mlp.gnvp(vectors(small_mlp.n_params, k=40))
    assert small_mlp._train_jacobians is None
    monkeypatch.setattr(Problem, "stored_products", lambda self, k: False)
    by_vectors = _conv_problem().gnvp(V)
    torch.testing.assert_close(kept, by_vectors, rtol=1e-11, atol=1e-13 * float(by_vectors.abs().max()))


def test_the_dense_gauss_newton_matrix_shares_the_kept_jacobians(monkeypatch):
    """On a network that reuses its weights, G at θˢ over the training set is built from the
    kept Jacobians (computing them on first use), so the products after it (`cg` after `exact`)
    compute none: bitwise the G built from fresh Jacobians, and equal to G's products. Any other
    batch or θ computes its own."""
    conv = _conv_problem()
    G = conv.gauss_newton_matrix()
    assert conv._train_jacobians is not None
    V = vectors(conv.n_params, k=3)
    monkeypatch.setattr(Problem, "_output_jacobians", lambda *a: pytest.fail("computed Jacobians again"))
    kept = conv.gnvp(V)
    torch.testing.assert_close(kept, V @ G, rtol=1e-10, atol=1e-12 * float(kept.abs().max()))
    monkeypatch.undo()
    fresh = _conv_problem()
    monkeypatch.setattr(Problem, "STORE_JACOBIANS_MAX", 0)
    assert torch.equal(fresh.gauss_newton_matrix(), G) and fresh._train_jacobians is None
    monkeypatch.undo()
    half = conv.train.subset(torch.arange(N // 2))
    calls = []
    original = Problem._output_jacobians
    monkeypatch.setattr(Problem, "_output_jacobians", lambda self, *a: calls.append(1) or original(self, *a))
    conv.gauss_newton_matrix(batch=half)
    conv.gauss_newton_matrix(params=conv.params.clone())
    assert len(calls) == 2


def test_a_lowered_copy_rounds_its_sources_kept_jacobians(monkeypatch):
    """Problem.lowered keeps no Jacobians of its own computation: it rounds its source's (computed
    there on first use, once for both), so its minibatch products are the source's kept
    Jacobians in float32, and `lissa` after `exact` computes no Jacobians at all."""
    conv = _conv_problem()
    low = conv.lowered(torch.float32)
    V, idx = vectors(conv.n_params, k=3), torch.tensor([4, 1, 9])
    calls = []
    original = Problem._output_jacobians
    monkeypatch.setattr(Problem, "_output_jacobians", lambda self, *a: calls.append(self.dtype) or original(self, *a))
    out = low.gnvp(V.float(), rows=idx)
    assert calls and set(calls) == {torch.float64}  # the source's, in its dtype
    assert conv._train_jacobians is not None and conv._train_jacobians[0].dtype == torch.float64
    assert torch.equal(low._train_jacobians[0], conv._train_jacobians[0].float())
    calls.clear()
    conv.gnvp(V), low.lowered(torch.float32).gnvp(V.float())
    assert not calls
    torch.testing.assert_close(out.double(), conv.gnvp(V, rows=idx), rtol=1e-5, atol=1e-6 * float(out.abs().max()))


def test_gnvp_over_training_rows_is_the_minibatch_product(mlp):
    """gnvp(rows=idx) is gnvp(batch=train.subset(idx)), from the kept Jacobians on a CNN and by
    vectors on an MLP (which keeps none); rows and batch together are refused."""
    idx = torch.tensor([5, 0, 7, 3])
    conv, small_mlp = _conv_problem(), mlp(SIZES, "tanh", n_train=N)
    for problem in (conv, small_mlp):
        V = vectors(problem.n_params, k=40)
        by_rows = problem.gnvp(V, rows=idx)
        by_batch = problem.gnvp(V, batch=problem.train.subset(idx))
        torch.testing.assert_close(by_rows, by_batch, rtol=1e-11, atol=1e-13 * float(by_batch.abs().max()))
    assert conv._train_jacobians is not None and small_mlp._train_jacobians is None
    with pytest.raises(ValueError, match="not both"):
        conv.gnvp(V, batch=conv.train, rows=idx)


@pytest.mark.parametrize("max_params", [16384, 0], ids=["float32-factor", "nystrom"])
def test_float32_preconditioners_keep_the_float64_certificate(mlp, max_params, monkeypatch):
    """DampedGaussNewton with inner_dtype=float32 and a Nyström rank (`exact`'s defaults) solves
    to the same rtol as the all-float64 solve, its residual measured with float64 products: a
    float32 dense factor, or a rank-ℓ Nyström approximation from float32 products, only
    preconditions float64 CG, which then takes fewer iterations than plain CG. Float32 alone
    is far from that residual (above 1e-7). A float32 factor that is not positive definite
    falls back to the float64 one; a Nyström approximation that fails, to plain CG."""
    from benchmark.linalg import NystromPreconditioner
    from benchmark.responses import DampedGaussNewton, SolverSettings
    problem = mlp((8, 16, 16, 4), "tanh", n_train=150, train_steps=30)
    mu = 1e-3  # κ(G + μI) ≈ 5e3: float32 rounding matters
    settings = SolverSettings(dense_max_params=max_params, linear_rtol=1e-12, nystrom_rank=60)
    B = problem.epsilon * problem.train_gradients(torch.arange(6))
    A = problem.gauss_newton_matrix() + mu * torch.eye(problem.n_params, dtype=torch.float64)
    expected = torch.linalg.solve(A, B.T).T
    float64_residual = lambda X: float(relative_residual(lambda V: problem.gnvp(V) + mu * V, X, B).max())

    curvature = DampedGaussNewton(problem, mu, settings, torch.float32)
    assert curvature.method == ("pcg (float32 factor)" if max_params else "pcg (rank-60 Nyström, float32 products)")
    X, info = curvature.solve(B)
    assert X.dtype == torch.float64 and info.converged
    assert float64_residual(X) <= 1e-11 and float(info.relative_residual.max()) <= 1e-11
    assert rel_err(X, expected) < 1e-7
    plain = DampedGaussNewton(problem, mu, SolverSettings(dense_max_params=0, linear_rtol=1e-12))
    assert plain.method == "cg"
    _, plain_info = plain.solve(B)
    assert info.iterations * 2 < plain_info.iterations
    low = problem.lowered(torch.float32)
    alone, _ = batched_cg(lambda V: low.gnvp(V) + mu * V, B.float(), rtol=1e-12, maxiter=300)
    assert float64_residual(alone.double()) > 1e-7

    if max_params:  # a float32 factor that is not positive definite: the float64 one
        real = torch.linalg.cholesky_ex
        monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda M: (M, torch.tensor(1)) if M.dtype == torch.float32
                            else real(M))
        fallback = DampedGaussNewton(problem, mu, settings, torch.float32)
        assert fallback.method == "dense"
    else:  # a Nyström approximation that fails: plain CG
        monkeypatch.setattr(torch.linalg, "cholesky",
                            lambda M: (_ for _ in ()).throw(torch.linalg.LinAlgError("not positive definite")))
        fallback = DampedGaussNewton(problem, mu, settings, torch.float32)
        assert fallback.method == "cg"
    Xf, info = fallback.solve(B)
    assert info.converged and float64_residual(Xf) <= 1e-11 and rel_err(Xf, expected) < 1e-7


def test_nystrom_preconditioner_is_the_inverse_on_its_range():
    """With ℓ = d the Nyström approximation is A itself: M⁻¹ = (λ_d + μ)(A + μI)⁻¹; with ℓ
    below d, M⁻¹ acts as (λ_ℓ + μ)(A + μI)⁻¹ on the top ℓ eigenvectors and as I on the rest."""
    from benchmark.linalg import NystromPreconditioner
    g = torch.Generator().manual_seed(0)
    d, mu = 30, 0.1
    Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    lam = torch.logspace(2, -3, d, dtype=torch.float64)
    A = (Q * lam) @ Q.T
    V = torch.randn(4, d, generator=g, dtype=torch.float64)
    full = NystromPreconditioner(lambda X: X @ A, d, d, mu, g, products_dtype=torch.float64)
    inverse = torch.linalg.inv(A + mu * torch.eye(d, dtype=torch.float64))
    torch.testing.assert_close(full.solve(V), (lam[-1] + mu) * V @ inverse, rtol=1e-8, atol=1e-10)
    A5 = (Q[:, :5] * lam[:5]) @ Q[:, :5].T  # rank 5: captured exactly by ℓ = 5
    part = NystromPreconditioner(lambda X: X @ A5, d, 5, mu, g, products_dtype=torch.float64)
    top, rest = Q[:, :5].T, Q[:, 5:].T
    torch.testing.assert_close(part.solve(top), (lam[4] + mu) * top / (lam[:5, None] + mu), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(part.solve(rest), rest, rtol=1e-6, atol=1e-8)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))
