"""The models of the autoencoder, CNN and Transformer tasks, and the harness paths they need:
functional calls (FunctionalModel) against module calls, frozen batch-norm statistics, a
convolutional Gauss–Newton product against per-example Jacobians, batch-norm training and its
cached buffers, Adam, chunked ground truth, and each task's smoke data.

The data tests read $IFBENCH_DATA_ROOT (else the default root) and skip where a dataset is not
staged; everything else builds its own tiny inputs.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmark import ground_truth as gt_mod
from benchmark.cache import Cache
from benchmark.problem import Batch, FunctionalModel, Problem, output_hessians
from benchmark.training import has_batch_norm, sgd
from tasks import TASKS, GroundTruthConfig, Recipe, ScaleConfig, Splits, Task, get_task
from tasks import data as datasets
from tasks.autoencoder import MnistAutoencoder
from tasks.cnn import CNN_TASKS
from tasks.transformer import PTBTransformer, build_vocabulary, tokenize, windows

DTYPE = torch.float64
NEW_TASKS = ["ae-mnist", *(T.name for T in CNN_TASKS), "transformer-ptb"]


def example_inputs(task: Task, scale: str, n: int, seed: int = 0) -> torch.Tensor:
    """Random inputs of the shape the task's model takes at `scale` (no dataset needed)."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(task, MnistAutoencoder):
        return torch.rand(n, 784 // task.config(scale).params.get("pool", 1) ** 2, generator=g, dtype=DTYPE)
    if isinstance(task, PTBTransformer):
        p = task.config(scale).params
        return torch.randint(p["vocab"], (n, p["seq_len"]), generator=g)
    c, size = task._geometry
    size //= task.config(scale).params["downsample"]
    return torch.randn(n, c, size, size, generator=g, dtype=DTYPE)


def randomize_buffers(module: nn.Module, seed: int = 1) -> None:
    """Running statistics far from (0, 1), so that using them (or not) shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=DTYPE))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g, dtype=DTYPE))


def built(name: str, scale: str = "smoke") -> tuple[Task, nn.Module, FunctionalModel]:
    task = get_task(name)
    torch.manual_seed(0)
    module = task.model(scale).to(DTYPE)
    randomize_buffers(module)
    return task, module, FunctionalModel(module)


# ---------------------------------------------------------------- functional = module

@pytest.mark.parametrize("name", NEW_TASKS)
def test_functional_call_equals_module_eval(name):
    task, module, model = built(name)
    x = example_inputs(task, "smoke", 5)
    with torch.no_grad():
        expected = module.eval()(x)
        got = model(model.flatten(), x)
    assert got.shape == expected.shape and got.dim() == 2
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # a perturbed θ goes through the functional call, not the module's own parameters
    theta = model.flatten() + 1e-3 * torch.randn(model.n_params, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
    model.load(theta)
    with torch.no_grad():
        torch.testing.assert_close(model(theta, x), module.eval()(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["vgg13-mnist", "resnet20-cifar", "vgg13-cifar", "resnet20-mnist"])
def test_batch_norm_statistics_are_frozen(name):
    task, module, model = built(name)
    assert has_batch_norm(module)
    x = example_inputs(task, "smoke", 6)
    before = {k: b.clone() for k, b in model.buffers.items()}
    theta = model.flatten()
    with torch.no_grad():
        full = model(theta, x)
        # per-example outputs do not depend on which other examples share the batch
        singles = torch.cat([model(theta, x[i:i + 1]) for i in range(len(x))])
        reordered = model(theta, x.flip(0)).flip(0)
        part = model(theta, x[:2])
        reference = module.eval()(x)
    torch.testing.assert_close(singles, full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reordered, full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(part, full[:2], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(full, reference, rtol=1e-12, atol=1e-12)
    for k, b in model.buffers.items():  # the functional calls never touch the buffers
        assert torch.equal(b, before[k]), k
    # batch statistics (train mode) would give different outputs: the frozen ones are in use
    with torch.no_grad():
        assert not torch.allclose(module.train()(x), full)
    module.eval()


def test_functional_call_does_not_update_buffers():
    task, module, model = built("resnet20-mnist")
    x = example_inputs(task, "smoke", 4)
    before = {k: b.clone() for k, b in model.buffers.items()}
    theta = model.flatten()
    model(theta, x)
    problem = Problem(task="t", scale="smoke", model=model, params=theta, train=Batch(x, torch.arange(4)),
                      query=Batch(x[:2], torch.arange(2)), loss=task.loss, damping=1e-3, weight_decay=0.0, seed=0)
    problem.gnvp(torch.randn(2, model.n_params, dtype=DTYPE))
    problem.gradients(problem.train)
    for k, b in model.buffers.items():
        assert torch.equal(b, before[k]), k


# ---------------------------------------------------------------- Gauss–Newton of a CNN with BN

class TinyConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x):
        return self.fc(F.max_pool2d(torch.relu(self.bn(self.conv(x))), 2).flatten(1))


def test_cnn_gnvp_matches_dense_per_example_jacobians():
    torch.manual_seed(0)
    module = TinyConvBN().to(DTYPE)
    randomize_buffers(module)
    model = FunctionalModel(module)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 1, 8, 8, generator=g, dtype=DTYPE)
    y = torch.tensor([0, 2, 1])
    loss = lambda out, t: F.cross_entropy(out, t, reduction="none")
    theta = model.flatten() + 0.1 * torch.randn(model.n_params, generator=g, dtype=DTYPE)
    problem = Problem(task="tiny", scale="smoke", model=model, params=theta, train=Batch(x, y),
                      query=Batch(x[:1], y[:1]), loss=loss, damping=1e-3, weight_decay=1e-2, seed=0)
    d = model.n_params
    G = torch.zeros(d, d, dtype=DTYPE)
    for i in range(3):  # dense: Jᵢᵀ Hᵢ Jᵢ, per-example Jacobians by reverse-mode autograd, H by hand
        J = torch.autograd.functional.jacobian(lambda th: torch.func.functional_call(
            module, (model.unflatten(th), model.buffers), (x[i:i + 1],))[0], theta)  # (3, d)
        p = torch.softmax(model(theta, x[i:i + 1])[0], 0).detach()
        H = torch.diag(p) - torch.outer(p, p)
        G += J.T @ H @ J / 3
    V = torch.randn(4, d, generator=g, dtype=DTYPE)
    torch.testing.assert_close(problem.gnvp(V), V @ G, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(problem.gauss_newton_matrix(), G, rtol=1e-10, atol=1e-12)
    H = output_hessians(loss, model(theta, x).detach(), y)
    assert H.shape == (3, 3, 3)


# ---------------------------------------------------------------- training paths

class _TinyBNTask(Task):
    """A synthetic task with batch norm (for build_problem and its cache; no dataset)."""

    name = "tiny-bn"
    version = 1

    def config(self, scale):
        # strong weight decay: ε/(wd + λ) = 0.08 with N = 24, a PBRF that converges (chunking test)
        return ScaleConfig(recipe=Recipe("sgd", epochs=3, batch_size=8, lr=0.05, momentum=0.9, weight_decay=0.5),
                           ground_truth=GroundTruthConfig(n_removed=3, n_query=3, n_eval=8, removed_chunk=2,
                                                          example_chunk=5))

    def data(self, scale, data_root):
        g = torch.Generator().manual_seed(0)
        x = 2.0 + 3.0 * torch.randn(30, 1, 8, 8, generator=g, dtype=DTYPE)
        y = torch.randint(3, (30,), generator=g)
        return Splits(x[:24], y[:24], x[24:], y[24:])

    def model(self, scale):
        return TinyConvBN()

    def loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets, reduction="none")


def test_batch_norm_training_updates_and_caches_running_statistics(tmp_path):
    task = _TinyBNTask()
    cache = Cache(tmp_path)
    problem = gt_mod.build_problem(task, "smoke", tmp_path, cache)
    stats = problem.model.buffers
    # trained in train mode: the running statistics moved from (0, 1) towards the data's
    assert stats["bn.num_batches_tracked"].item() == 3 * 3
    assert stats["bn.running_mean"].abs().max() > 0.1
    assert problem.chunk_size == 5
    # the module holds the same statistics, and eval-mode module = functional call
    x = problem.query.inputs
    problem.model.load(problem.params)
    with torch.no_grad():
        torch.testing.assert_close(problem.model.module.eval()(x), problem.outputs(x), rtol=1e-12, atol=1e-12)
    # a second build loads θˢ and the buffers from the cache (a fresh module starts at (0, 1))
    again = gt_mod.build_problem(task, "smoke", tmp_path, cache)
    for k, b in stats.items():
        assert torch.equal(again.model.buffers[k], b), k
    torch.testing.assert_close(again.outputs(x), problem.outputs(x), rtol=0, atol=0)
    entry = torch.load(next((tmp_path / "models").glob("*.pt")), weights_only=True)
    assert set(entry["value"]["buffers"]) == set(stats)
    # the training certificate is that of the eval-mode objective at the final statistics
    from benchmark.training import full_objective_gradient
    value, _ = full_objective_gradient(problem.model, task.loss, problem.train, problem.params, 0.5)
    assert value == pytest.approx(problem.training_certificate["objective"], rel=1e-12)


def test_every_response_function_and_estimator_uses_the_frozen_statistics(tmp_path):
    """Every forward pass of every response function (PBRF, linearized, warm / proximal
    retraining) and of every default estimator runs batch norm in eval mode with the running
    statistics of θˢ, and leaves them unchanged; cold retraining alone runs in train mode (as the
    base training did) and leaves the module's statistics unchanged too."""
    from benchmark.ground_truth import ALL_RESPONSES, load_ground_truth
    from estimators import DEFAULT_ESTIMATORS, ParameterEstimator, make_estimator
    task = _TinyBNTask()
    problem = gt_mod.build_problem(task, "smoke", tmp_path, Cache(tmp_path))
    frozen = {k: b.clone() for k, b in problem.model.buffers.items()}
    seen, violations, training = [], [], []
    cold = [False]

    def check(module, _inputs):
        seen.append(1)
        if module.training:
            training.append(1)
            if not cold[0]:
                violations.append("train mode")
        for name in ("running_mean", "running_var"):  # cold: each retrained row's own statistics
            if not cold[0] and not torch.equal(getattr(module, name), frozen[f"bn.{name}"]):
                violations.append(f"{name} differs from θˢ's")

    handles = [m.register_forward_pre_hook(check) for m in problem.model.module.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        gt, _ = load_ground_truth(task, "smoke", problem, Cache(tmp_path))  # pbrf and linear
        assert seen, "no forward pass through batch norm"
        for name in ALL_RESPONSES:  # the retraining ones computed now (a -controlled one with its run)
            before, cold[0] = len(seen), name.startswith("cold")
            assert torch.isfinite(gt.scores(name)).all(), name
            assert len(seen) > before or name.endswith("-controlled") or name in ("pbrf", "linear"), name
        cold[0] = False
        assert training, "cold retraining never ran in train mode"
        for spec in DEFAULT_ESTIMATORS:
            est = make_estimator(spec if spec != "lissa" else "lissa(depth=20)").fit(problem)
            if isinstance(est, ParameterEstimator):
                est.parameter_change(gt.removed)
            est.scores(gt.removed, problem.query)
    finally:
        for h in handles:
            h.remove()
    assert not violations, sorted(set(violations))
    for k, b in problem.model.buffers.items():
        assert torch.equal(b, frozen[k]), k


def test_adam_matches_torch_optim():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)
    model = FunctionalModel(module)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 4, generator=g, dtype=DTYPE), torch.randint(3, (20,), generator=g)
    loss = lambda out, t: F.cross_entropy(out, t, reduction="none")
    recipe = Recipe("adam", epochs=3, batch_size=8, lr=1e-2, weight_decay=1e-2, seed=0)
    theta0 = model.flatten()
    ours = sgd(model, loss, Batch(x, y), theta0, recipe)
    th = theta0.clone().requires_grad_(True)
    opt = torch.optim.Adam([th], lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    from benchmark.training import batch_order
    for _, idx in batch_order(20, 8, 3, 0):
        opt.zero_grad()
        (loss(model(th, x[idx]), y[idx]).mean() + 0.5e-2 * th.pow(2).sum()).backward()
        opt.step()
    torch.testing.assert_close(ours, th.detach(), rtol=1e-10, atol=1e-12)
    # stacked rows (retraining) give the same as one row
    stacked = sgd(model, loss, Batch(x, y), theta0.expand(2, -1).clone(), recipe)
    torch.testing.assert_close(stacked[1], ours, rtol=1e-10, atol=1e-12)


def test_chunked_ground_truth_equals_unchunked(tmp_path):
    task = _TinyBNTask()
    problem = gt_mod.build_problem(task, "smoke", tmp_path, Cache(tmp_path))
    removed, eval_idx = torch.tensor([1, 5, 9]), torch.arange(6)
    settings = gt_mod.solver_settings(task, "smoke")
    curvature = gt_mod._LazyCurvature(problem, settings)
    for name in ("linear", "pbrf"):
        whole = gt_mod.compute_response(problem, name, removed, eval_idx, curvature)
        chunked = gt_mod.compute_response(problem, name, removed, eval_idx, curvature, chunk=2)
        assert chunked["scores"].shape == whole["scores"].shape == (3, 3)
        assert chunked["outputs"].shape == whole["outputs"].shape
        tol = 1e-10 if name == "linear" else 1e-5
        torch.testing.assert_close(chunked["scores"], whole["scores"], rtol=tol, atol=1e-14)
        cert = chunked["certificate"]
        assert cert["removed_chunks"] == 2
        if name == "pbrf":
            assert len(cert["status"]) == len(cert["relative_gradient_norm"]) == 3
            assert cert["status"] == whole["certificate"]["status"]


def test_unset_chunks_leave_existing_cache_keys_alone():
    mlp = get_task("mlp-mnist")
    fp = gt_mod.response_fingerprint(mlp, "smoke", "pbrf", gt_mod.solver_settings(mlp, "smoke"))
    assert "removed_chunk" not in fp["ground_truth"] and "example_chunk" not in fp["ground_truth"]
    paper = get_task("vgg13-cifar")
    fp = gt_mod.response_fingerprint(paper, "paper", "pbrf", gt_mod.solver_settings(paper, "paper"))
    assert fp["ground_truth"]["removed_chunk"] == 5


# ---------------------------------------------------------------- the tasks' configs and data

@pytest.mark.parametrize("name", NEW_TASKS)
def test_scales_are_configured(name):
    task = get_task(name)
    assert name in TASKS
    for scale in ("smoke", "cpu", "paper"):
        cfg = task.config(scale)
        assert cfg.recipe.optimizer in ("sgd", "adam")
        assert cfg.ground_truth.n_removed >= 4 and cfg.ground_truth.n_query >= 4
    paper = task.config("paper").recipe
    if name.startswith("transformer"):
        assert paper.optimizer == "adam" and paper.epochs == 10
    elif name.startswith("ae"):
        assert (paper.batch_size, paper.weight_decay, paper.epochs) == (1024, 1e-5, 1000) and paper.momentum > 0
    else:
        assert (paper.batch_size, paper.weight_decay, paper.epochs) == (128, 5e-4, 200)
        if name.endswith("cifar"):
            assert paper.lr_milestones == (60, 120, 160) and paper.lr_gamma == 0.2
        else:
            assert paper.lr_milestones == ()
    # the paper's damping λ = 1e-3 everywhere but the CIFAR CNNs at cpu (tasks/cnn.py, _CIFAR_DAMPING),
    # and the damping in force is the one the cache keys carry
    cifar_cpu = name.endswith("cifar")
    for scale in ("smoke", "cpu", "paper"):
        expected = 1e-2 if cifar_cpu and scale == "cpu" else 1e-3
        assert task.damping_at(scale) == task.fingerprint(scale)["damping"] == expected, scale


@pytest.fixture(scope="module")
def data_root():
    return datasets.default_data_root()


@pytest.mark.parametrize("name", NEW_TASKS)
def test_smoke_data(name, data_root):
    task = get_task(name)
    try:
        splits = task.data("smoke", data_root)
    except datasets.DatasetMissing as exc:
        pytest.skip(f"dataset not staged in {data_root}: {exc}")
    n = task.config("smoke").params["n_train"]
    assert splits.n_train == n and len(splits.y_train) == n
    assert len(splits.x_query) == len(splits.y_query) >= task.config("smoke").ground_truth.n_query
    x = example_inputs(task, "smoke", 1)
    assert splits.x_train.shape[1:] == x.shape[1:] and splits.x_query.shape[1:] == x.shape[1:]
    assert splits.x_train.dtype == x.dtype
    with torch.no_grad():  # the model takes the data and the loss is finite per example
        out = task.model("smoke").to(DTYPE)(splits.x_train[:3])
        losses = task.loss(out, splits.y_train[:3])
    assert losses.shape == (3,) and torch.isfinite(losses).all()
    if isinstance(task, PTBTransformer):
        # training windows come from the training split, queries from the test split
        p = task.config("smoke").params
        vocab = task.vocabulary("smoke", data_root)
        corpus = {k: tokenize(v) for k, v in datasets.load_ptb(data_root).items()}
        rows = lambda w: {tuple(r.tolist()) for r in w}
        train_windows, test_windows = rows(windows(corpus["train"], vocab, p["seq_len"])), \
            rows(windows(corpus["test"], vocab, p["seq_len"]))
        full = lambda xs, ys: rows(torch.cat([xs, ys[:, -1:]], 1))
        assert full(splits.x_train, splits.y_train) <= train_windows
        assert full(splits.x_query, splits.y_query) <= test_windows
        assert int(splits.y_train.max()) < p["vocab"]
        return
    if isinstance(task, MnistAutoencoder):
        assert torch.equal(splits.x_train, splits.y_train) and torch.equal(splits.x_query, splits.y_query)
        assert 0 <= float(splits.x_train.min()) and float(splits.x_train.max()) <= 1
    else:
        assert splits.y_train.dtype == torch.long and int(splits.y_train.max()) <= 9
    # no query image is a training image
    train = splits.x_train.reshape(n, -1)
    query = splits.x_query.reshape(len(splits.x_query), -1)
    assert not (torch.cdist(query, train) == 0).any()


def test_vocabulary_and_windows():
    tokens = tokenize("a b c\n b a\n\n c")
    assert tokens == ["a", "b", "c", "<eos>", "b", "a", "<eos>", "c", "<eos>"]
    vocab = build_vocabulary(tokens, size=3)
    assert vocab == {"<unk>": 0, "<eos>": 1, "a": 2}
    w = windows(tokens, vocab, 3)
    assert w.tolist() == [[2, 0, 0, 1], [0, 2, 1, 0]]


def test_transformer_is_causal():
    task, module, model = built("transformer-ptb")
    p = task.config("smoke").params
    x = example_inputs(task, "smoke", 2)
    changed = x.clone()
    changed[:, -1] = (changed[:, -1] + 1) % p["vocab"]
    with torch.no_grad():
        a = model(model.flatten(), x).reshape(2, p["seq_len"], -1)
        b = model(model.flatten(), changed).reshape(2, p["seq_len"], -1)
    torch.testing.assert_close(a[:, :-1], b[:, :-1], rtol=0, atol=0)
    assert not torch.allclose(a[:, -1], b[:, -1])
