"""The closed-form output-space Hessian–vector products of tasks.losses against autodiff, and the
Gauss–Newton operators that use them against the same operators by autodiff."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import grad, jvp, vmap

from benchmark.problem import Batch, FunctionalModel, Problem, output_hessians
from tasks import TASKS
from tasks.losses import binary_cross_entropy, cross_entropy, squared_error, token_cross_entropy

DTYPE = torch.float64


def cases(n: int = 7, g: torch.Generator | None = None):
    """(loss, outputs (n, C), targets) for every loss of tasks.losses, on random logits."""
    g = g or torch.Generator().manual_seed(0)
    y = lambda C: 3 * torch.randn(n, C, generator=g, dtype=DTYPE)
    return [
        (squared_error, y(3), torch.randn(n, 3, generator=g, dtype=DTYPE)),
        (cross_entropy, y(10), torch.randint(10, (n,), generator=g)),
        (binary_cross_entropy, y(1), torch.randint(2, (n,), generator=g).to(DTYPE)),  # logistic regression
        (binary_cross_entropy, y(6), torch.rand(n, 6, generator=g, dtype=DTYPE)),  # autoencoder pixels
        (token_cross_entropy, y(4 * 5), torch.randint(5, (n, 4), generator=g)),  # T = 4 positions of V = 5
    ]


def autodiff_hvp(loss, out, targets, v):
    return jvp(grad(lambda o: loss(o, targets).sum()), (out,), (v,))[1]


@pytest.mark.parametrize("k", range(5))
def test_closed_form_output_hvp_is_the_autodiff_one(k):
    loss, out, targets = cases()[k]
    V = torch.randn(3, *out.shape, dtype=DTYPE, generator=torch.Generator().manual_seed(k))
    closed = vmap(lambda v: loss.output_hvp(out, targets, v))(V)
    reference = vmap(lambda v: autodiff_hvp(loss, out, targets, v))(V)
    assert closed.shape == reference.shape == V.shape
    assert torch.allclose(closed, reference, rtol=1e-12, atol=1e-14 * float(reference.abs().max()))


@pytest.mark.parametrize("k", range(5))
def test_output_hessians_from_the_closed_form_equal_autodiff(k):
    loss, out, targets = cases()[k]
    plain = lambda o, t: loss(o, t)  # no output_hvp: the autodiff path
    H, reference = output_hessians(loss, out, targets), output_hessians(plain, out, targets)
    assert H.shape == (len(out), out.shape[1], out.shape[1])
    assert torch.allclose(H, reference, rtol=1e-12, atol=1e-14)
    assert torch.allclose(H, H.transpose(1, 2), atol=1e-15)


def test_the_losses_compute_what_the_tasks_computed_before():
    """The values are unchanged bit for bit (cached models and ground truths stay valid)."""
    F = torch.nn.functional
    for loss, out, t in cases():
        if loss is squared_error:
            old = 0.5 * (out - t).pow(2).sum(dim=1)
        elif loss is cross_entropy:
            old = F.cross_entropy(out, t, reduction="none")
        elif loss is binary_cross_entropy and out.shape[1] == 1:
            old = F.binary_cross_entropy_with_logits(out[:, 0], t, reduction="none")
        elif loss is binary_cross_entropy:
            old = F.binary_cross_entropy_with_logits(out, t, reduction="none").sum(dim=1)
        else:
            n, T = t.shape
            old = F.cross_entropy(out.reshape(n * T, -1), t.reshape(-1), reduction="none").reshape(n, T).mean(dim=1)
        assert torch.equal(loss(out, t), old)


def test_every_task_has_a_closed_form_loss():
    """Every task's Gauss–Newton products take the closed form (a plain function would fall back
    to autodiff silently, about twice the cost of a product on a small net)."""
    for name, cls in TASKS.items():
        assert callable(getattr(cls().loss, "output_hvp", None)), name


def _problem(loss, outputs: int, autodiff: bool = False) -> Problem:
    """A small tanh MLP with `loss`; autodiff: the loss as a plain function (no closed form)."""
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    module = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, outputs)).to(DTYPE)
    model = FunctionalModel(module)
    X = torch.randn(20, 4, generator=g, dtype=DTYPE)
    _, _, targets = next((c for c in cases(20, g) if c[0] is loss and c[1].shape[1] == outputs))
    return Problem(task="losses", scale="smoke", model=model, params=model.flatten(), train=Batch(X, targets),
                   query=Batch(X[:3], targets[:3]), loss=(lambda o, t: loss(o, t)) if autodiff else loss,
                   damping=1e-3, weight_decay=1e-2, seed=0)


@pytest.mark.parametrize("loss, outputs", [(squared_error, 3), (cross_entropy, 10), (binary_cross_entropy, 6),
                                           (token_cross_entropy, 20)])
def test_gauss_newton_operators_equal_the_autodiff_ones(loss, outputs):
    fast, slow = _problem(loss, outputs), _problem(loss, outputs, autodiff=True)
    V = torch.randn(3, fast.n_params, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
    theta = fast.params + 0.1 * V[0]
    for a, b in ((fast.gnvp(V), slow.gnvp(V)), (fast.gnvp(V, params=theta), slow.gnvp(V, params=theta)),
                 (fast.gauss_newton_matrix(), slow.gauss_newton_matrix())):
        assert torch.allclose(a, b, rtol=1e-11, atol=1e-13 * float(b.abs().max()))
