"""The read-only problem every estimator and every response function works on.

Notation (DESIGN.md §1): N training examples, d parameters, C outputs, ε = 1/N,
μ = wd + λ (weight decay plus damping). Per-example loss ℓᵢ(θ) = L(f(θ, xᵢ), tᵢ).
G = (1/N) Σᵢ Jᵢᵀ H_y,ᵢ Jᵢ is the Gauss–Newton Hessian of the data term at θ.

All operators take and return flat parameter vectors: θ has shape (d,), a stack of k
vectors has shape (k, d). Products are batched over the k vectors with torch.func.vmap and
chunked over training examples to bound memory. Every operator adds to `problem.counter`.

Library code (hooks, torch.optim, DataLoaders, K-FAC packages) gets a plain nn.Module and a
DataLoader instead: `problem.module()` (a private copy at θˢ, eval mode, frozen buffers) and
`problem.train_loader(batch_size)`; the loss of a batch is `problem.loss(outputs, targets).mean()`.
Those evaluations are NOT counted by `problem.counter` (nor interrupted by the time budget);
code that uses them should report its own work with `problem.counter.add(kind, n)`.
"""
from __future__ import annotations

import copy
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

from .linalg import add_gram_

LossFn = Callable[[Tensor, Tensor], Tensor]
log = logging.getLogger("ifbench")


class Batch(NamedTuple):
    """Inputs (n, ...) and targets (n, ...) of n examples."""

    inputs: Tensor
    targets: Tensor

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def subset(self, idx: Tensor) -> "Batch":
        return Batch(self.inputs[idx], self.targets[idx])


class FunctionalModel:
    """f(θ, x) for a module, with θ a flat (d,) vector and buffers frozen (eval mode)."""

    def __init__(self, module: nn.Module):
        self.module = module.eval()
        named = [(k, p) for k, p in module.named_parameters()]
        self.names = [k for k, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.buffers = {k: b.detach() for k, b in module.named_buffers()}

    @property
    def n_params(self) -> int:
        return sum(self.numels)

    def flatten(self) -> Tensor:
        """The module's current parameters as one (d,) vector."""
        return torch.cat([p.detach().reshape(-1) for p in self.module.parameters()])

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        parts = torch.split(theta, self.numels)
        return {k: v.view(s) for k, v, s in zip(self.names, parts, self.shapes)}

    def load(self, theta: Tensor) -> None:
        """Write θ into the module's parameters (used by training, never by estimators)."""
        with torch.no_grad():
            for p, v in zip(self.module.parameters(), torch.split(theta, self.numels)):
                p.copy_(v.view_as(p))

    def set_buffers(self, buffers: dict[str, Tensor]) -> None:
        """Freeze the buffers (batch-norm running statistics) at these values, in the module too
        (each converted to its buffer's device and dtype)."""
        current = dict(self.module.named_buffers())
        with torch.no_grad():
            for k, v in buffers.items():
                current[k].copy_(v.to(device=current[k].device, dtype=current[k].dtype))
        self.buffers = {k: b.detach() for k, b in self.module.named_buffers()}

    def __call__(self, theta: Tensor, x: Tensor, buffers: dict[str, Tensor] | None = None) -> Tensor:
        """f(θ, x), with the frozen buffers, or with `buffers` (a retrained net's own statistics)."""
        return functional_call(self.module, (self.unflatten(theta), self.buffers if buffers is None else buffers), (x,))

    def initial_buffers(self) -> dict[str, Tensor]:
        """The buffers of a freshly built module (batch norm: running mean 0, variance 1, no
        batches seen), the state base training started from at θ⁰."""
        fresh = {k: b.clone() for k, b in self.buffers.items()}
        for name, m in self.module.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                prefix = f"{name}." if name else ""
                fresh[prefix + "running_mean"].zero_()
                fresh[prefix + "running_var"].fill_(1.0)
                fresh[prefix + "num_batches_tracked"].zero_()
        return fresh


class TimeBudgetExceeded(BaseException):
    """Raised by the problem's operators once the row's time budget has run out. A BaseException
    (like KeyboardInterrupt), so that an estimator's `except Exception` does not swallow it. It is
    raised at the entry of an operator call like any ordinary exception, never from a signal
    handler (which can fire inside torch internals and leave forward-mode AD levels behind)."""


@dataclass
class EvaluationCounter:
    """Hardware-free cost: model evaluations in example × vector units, by kind.

    forward: one output evaluation; gradient: one per-example gradient (forward + backward);
    gnvp / hvp: one example's contribution to one Gauss–Newton / Hessian–vector product.
    """

    counts: Counter

    def __init__(self) -> None:
        self.counts = Counter()
        #: time.monotonic() after which every operator call raises TimeBudgetExceeded (the
        #: harness sets it around an estimator's fit and scores under --time-budget)
        self.deadline: float | None = None

    def add(self, kind: str, n: int) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TimeBudgetExceeded("the time budget ran out (checked when an operator of the problem was called)")
        self.counts[kind] += int(n)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return {"total": self.total, **dict(sorted(self.counts.items()))}

    def reset(self) -> None:
        self.counts.clear()


class Problem:
    """A trained task, frozen: the base parameters θˢ, the data, the loss and the operators.

    Attributes: task, scale, model (FunctionalModel), params θˢ (d,), train / query (Batch),
    loss (per-example, convex in outputs), damping λ, weight_decay wd, epsilon ε = 1/N, seed,
    theta0 θ⁰ (d,) and training_certificate (how base training ended).
    Estimators must not modify any of them; the harness checks that they do not.
    """

    def __init__(
        self,
        *,
        task: str,
        scale: str,
        model: FunctionalModel,
        params: Tensor,
        train: Batch,
        query: Batch,
        loss: LossFn,
        damping: float,
        weight_decay: float,
        seed: int,
        theta0: Tensor | None = None,
        training_certificate: dict | None = None,
        chunk_size: int = 1024,
    ):
        self.task = task
        self.scale = scale
        self.model = model
        self.params = params.detach()
        self.train = train
        self.query = query
        self.loss = loss
        self.damping = float(damping)
        self.weight_decay = float(weight_decay)
        self.seed = int(seed)
        self.theta0 = theta0  # the initialisation θˢ was trained from (for retraining)
        self.training_certificate = training_certificate or {}
        self.chunk_size = int(chunk_size)
        self.counter = EvaluationCounter()
        #: () -> list of benchmark.training.Checkpoint, set by the harness (computed and cached on
        #: first use); None: a problem without a training history (see `checkpoints`)
        self.checkpoint_source: Callable[[], list] | None = None
        # computed on first use: outputs per example C, forward flops per example, and the
        # training set's Jacobians at θˢ with its outputs (see STORE_JACOBIANS_MAX)
        self._n_outputs: int | None = None
        self._forward_flops: float | None = None
        self._train_jacobians: tuple[Tensor, Tensor] | None = None
        #: a lowered copy's source problem (`lowered`), whose kept Jacobians it rounds instead of
        #: computing its own
        self._jacobians_source: "Problem | None" = None

    def checkpoints(self) -> list:
        """θ at a few epoch ends of the base training, as benchmark.training.Checkpoint (epoch,
        theta (d,), weight η·epochs/|B|), oldest first, for TracIn-style estimators. Fresh copies
        on every call (read-only for the problem's purposes). A problem built without a training
        history (the conformance checks' small problems) has one: θˢ with weight ε."""
        from .training import Checkpoint
        if self.checkpoint_source is None:
            return [Checkpoint(0, self.params.clone(), self.epsilon)]
        return [Checkpoint(c.epoch, c.theta.to(self.device).clone(), c.weight) for c in self.checkpoint_source()]

    # ---- sizes -----------------------------------------------------------------------------
    @property
    def n_train(self) -> int:
        return len(self.train)

    @property
    def n_params(self) -> int:
        return int(self.params.numel())

    @property
    def epsilon(self) -> float:
        """ε = 1/N: removing one example is downweighting it by ε."""
        return 1.0 / self.n_train

    @property
    def dtype(self) -> torch.dtype:
        return self.params.dtype

    @property
    def device(self) -> torch.device:
        return self.params.device

    def _theta(self, params: Tensor | None) -> Tensor:
        return self.params if params is None else params

    def _chunks(self, batch: Batch, size: int | None = None):
        size = size or self.chunk_size
        for start in range(0, len(batch), size):
            yield Batch(batch.inputs[start:start + size], batch.targets[start:start + size])

    def lowered(self, dtype: torch.dtype) -> "Problem":
        """The same problem in `dtype` (float32: a cheaper, rounded copy for inner solves): its own
        cast copy of the module, θˢ and the floating inputs and targets; the counter is shared,
        so its evaluations count as this problem's. Its kept training Jacobians (where it keeps
        them) are this problem's, computed here on first use and rounded to `dtype`: no slower
        than its own (ResNet-20 at cpu, one thread: 11.0 s in float64, 11.7 s in float32), free
        when this problem has them already (`exact` before `lissa`), and closer to the float64
        ones (its own float32 Jacobians differ from them by 6.5e-4 there, relative). Everything
        else is this problem's."""
        def cast(t: Tensor | None) -> Tensor | None:
            return t.to(dtype) if t is not None and t.is_floating_point() else t

        low = copy.copy(self)
        low.model = FunctionalModel(copy.deepcopy(self.model.module).to(dtype))
        low.model.set_buffers({k: cast(b) for k, b in self.model.buffers.items()})
        low.params, low.theta0 = cast(self.params), cast(self.theta0)
        low.train = Batch(cast(self.train.inputs), cast(self.train.targets))
        low.query = Batch(cast(self.query.inputs), cast(self.query.targets))
        low._train_jacobians, low._jacobians_source = None, self
        return low

    # ---- library access ----------------------------------------------------------------------
    def module(self) -> nn.Module:
        """A fresh deep copy of the model's nn.Module with θˢ loaded, in eval mode, its buffers
        (batch-norm running statistics) frozen at `model.buffers`, requires_grad on every
        parameter, sharing no storage with the problem: for library code (hooks, torch.optim).
        Its loss over a batch is `problem.loss(module(inputs), targets).mean()`. Evaluations
        through it are NOT counted by `problem.counter`: report them with `counter.add`."""
        copied = FunctionalModel(copy.deepcopy(self.model.module))  # FunctionalModel sets eval mode
        copied.load(self.params)
        copied.set_buffers(self.model.buffers)
        for p in copied.module.parameters():
            p.requires_grad_(True)
        return copied.module

    def train_loader(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> "torch.utils.data.DataLoader":
        """A DataLoader over the training set yielding (inputs, targets) batches, in order, or
        shuffled by a torch.Generator seeded with `seed`. Not counted by `problem.counter`."""
        from torch.utils.data import DataLoader, TensorDataset
        # a generator of its own even unshuffled: a DataLoader's iterator draws its base seed from
        # it, and would otherwise consume torch's global random state
        return DataLoader(TensorDataset(self.train.inputs, self.train.targets), batch_size=batch_size,
                          shuffle=shuffle, generator=torch.Generator().manual_seed(seed))

    # ---- evaluations -----------------------------------------------------------------------
    def outputs(self, inputs: Tensor, params: Tensor | None = None) -> Tensor:
        """f(θ, x) for inputs (n, ...) -> (n, C); θ defaults to θˢ."""
        theta = self._theta(params)
        self.counter.add("forward", inputs.shape[0])
        with torch.no_grad():
            return torch.cat([self.model(theta, inputs[s:s + self.chunk_size])
                              for s in range(0, inputs.shape[0], self.chunk_size)])

    def losses(self, batch: Batch, params: Tensor | None = None) -> Tensor:
        """ℓᵢ(θ) for each example of `batch` -> (n,)."""
        out = self.outputs(batch.inputs, params)
        return self.loss(out, batch.targets)

    def _example_loss(self, theta: Tensor, x: Tensor, t: Tensor) -> Tensor:
        return self.loss(self.model(theta, x.unsqueeze(0)), t.unsqueeze(0))[0]

    def gradients(self, batch: Batch, params: Tensor | None = None) -> Tensor:
        """Per-example gradients ∇θ ℓᵢ(θ) (no weight decay) -> (n, d)."""
        theta = self._theta(params)
        self.counter.add("gradient", len(batch))
        per_example = vmap(grad(self._example_loss), in_dims=(None, 0, 0))
        return torch.cat([per_example(theta, c.inputs, c.targets).detach()
                          for c in self._chunks(batch)])

    def gradient_chunks(self, batch: Batch, params: Tensor | None = None):
        """Per-example gradients of `batch` in chunks of `chunk_size` examples: yields (c, d)
        tensors, never all n × d at once (for streaming estimators); counted as `gradients`."""
        for c in self._chunks(batch):
            yield self.gradients(c, params)

    def train_gradients(self, train_idx: Tensor) -> Tensor:
        """∇ℓₘ(θˢ) for the training examples `train_idx` -> (len(train_idx), d)."""
        return self.gradients(self.train.subset(train_idx))

    # ---- curvature products ------------------------------------------------------------------
    def _output_hvp(self, out: Tensor, targets: Tensor, v_out: Tensor) -> Tensor:
        """H_y v in output space: Hessian of Σᵢ L(yᵢ, tᵢ) at y=out applied to v_out (n, C)."""
        return output_hvp(self.loss, out, targets, v_out)

    def forward_flops(self, n: int = 8) -> float:
        """Flops of one forward pass f(θˢ, x) per example, counted by torch's FlopCounterMode
        (matrix products and convolutions) over n training inputs: 2d for an MLP, many times 2d
        for a CNN, whose convolutions reuse their weights at every position. Counted once."""
        if self._forward_flops is None:
            from torch.utils.flop_counter import FlopCounterMode
            x = self.train.inputs[:n]
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                self.model(self.params, x)
            self._forward_flops = counter.get_total_flops() / len(x)
        return self._forward_flops

    @property
    def n_outputs(self) -> int:
        """C, the number of outputs f(θ, x) has per example (one uncounted forward pass, once)."""
        if self._n_outputs is None:
            with torch.no_grad():
                self._n_outputs = self.model(self.params, self.train.inputs[:1]).numel()
        return self._n_outputs

    def products_by_jacobians(self, k: int) -> bool:
        """Whether gnvp_sum takes k vectors through the per-example output Jacobians J (n, C, d)
        (C vector–Jacobian products per example, F(1 + 2C) flops for a forward pass of F, then
        JV and Jᵀ(H JV) as matrix products, 4Cdk) rather than k Jacobian–vector and k
        vector–Jacobian products (about 4Fk): only for more vectors than outputs, and where the
        flop count says so, i.e. where a forward pass costs many flops per parameter. Measured
        (one thread, 128 examples, 40 vectors): LeNet-MNIST at cpu 512 → 83 ms (the rule takes
        the Jacobians), mlp-mnist at cpu 15 → 268 ms (it does not)."""
        n_outputs = self.n_outputs
        if k <= n_outputs:
            return False
        F, d = self.forward_flops(), self.n_params
        return F * (1 + 2 * n_outputs) + 4 * n_outputs * d * k < 4 * F * k

    def _output_jacobians(self, theta: Tensor, inputs: Tensor) -> Tensor:
        """∂f(θ, xᵢ)/∂θ for each input (n, ...) -> (n, C, d), by C vector–Jacobian products."""
        J = vmap(jacrev(lambda th, x: self.model(th, x.unsqueeze(0))[0]), in_dims=(None, 0))(theta, inputs)
        return J.detach()

    def _jacobian_chunk_size(self, theta: Tensor, batch: Batch) -> int:
        """Examples per chunk so that the Jacobians hold at most JACOBIAN_MAX_NUMBERS numbers."""
        n_outputs = self.model(theta, batch.inputs[:1]).numel()
        return max(1, min(self.chunk_size, self.JACOBIAN_MAX_NUMBERS // (n_outputs * theta.numel())))

    def gnvp_sum(self, theta: Tensor, vectors: Tensor, batch: Batch) -> Tensor:
        """Σ_{i∈batch} Jᵢᵀ H_y,ᵢ Jᵢ v at θ for vectors (k, d) -> (k, d); uncounted, vmappable over θ
        (with one vector). Many vectors on a CNN go through the Jacobians (products_by_jacobians):
        the same product to rounding."""
        if self.products_by_jacobians(vectors.shape[0]):
            return self._gnvp_sum_by_jacobians(theta, vectors, batch)
        total = torch.zeros_like(vectors)
        for c in self._chunks(batch):
            f = lambda th: self.model(th, c.inputs)
            out, vjp_fn = vjp(f, theta)

            def one(v: Tensor) -> Tensor:
                jv = jvp(f, (theta,), (v,))[1]
                return vjp_fn(self._output_hvp(out, c.targets, jv))[0]

            total = total + vmap(one)(vectors)
        return total

    def _gnvp_sum_by_jacobians(self, theta: Tensor, vectors: Tensor, batch: Batch) -> Tensor:
        """gnvp_sum through the per-example Jacobians, chunk by chunk."""
        total = torch.zeros_like(vectors)
        for c in self._chunks(batch, self._jacobian_chunk_size(theta, batch)):
            J = self._output_jacobians(theta, c.inputs)
            total = total + _jacobian_products(self, J, self.model(theta, c.inputs).detach(), c.targets, vectors)
        return total

    #: the training set's Jacobians at θˢ are kept after the first product that takes them
    #: (gnvp over the training set or its `rows` at θˢ: CG's every iteration, LiSSA's every
    #: minibatch), or the first dense G at θˢ on a weight-reusing net (`exact`, then shared with
    #: the products), when they hold at most this many
    #: numbers (1 GiB in float64; ResNet-20 at cpu: 98M); every later product is then two matrix
    #: products. 0: never kept.
    STORE_JACOBIANS_MAX = 2 ** 27

    #: a forward pass of at least this many flops per parameter reuses its weights (convolutions;
    #: a linear layer or an MLP costs 2 per parameter)
    WEIGHT_REUSE_FLOPS = 4.0

    def stored_products(self, k: int) -> bool:
        """Whether a product of k vectors over the training set at θˢ goes through the kept
        Jacobians (computed on first use): where products_by_jacobians says so, and on any
        network that reuses its weights, whose products the flop count misjudges. Measured on
        vgg13-mnist at cpu (F = 7.7 flops per parameter, d = 9,644, one thread): 40 vectors over
        the 1,000 examples 18.5 s by forward and reverse mode, 1.33 s by the kept Jacobians
        (7.8 s once to compute them), equal to 3e-15; its `cg` row spent 1,247 s in 101 such
        products. An MLP's products are matrix products already (mlp-mnist: the rule keeps them)."""
        return self.products_by_jacobians(k) or self._reuses_weights()

    def _reuses_weights(self) -> bool:
        """Whether the training set's Jacobians fit STORE_JACOBIANS_MAX and the network reuses its
        weights (WEIGHT_REUSE_FLOPS): then they are kept on first use, by products and by the
        dense Gauss–Newton matrix alike."""
        fits = self.n_train * self.n_outputs * self.n_params <= self.STORE_JACOBIANS_MAX
        return fits and self.forward_flops() >= self.WEIGHT_REUSE_FLOPS * self.n_params

    def _stored_train_jacobians(self) -> tuple[Tensor, Tensor] | None:
        """(J (N, C, d), f(θˢ, x) (N, C)) over the training set at θˢ, computed once, or None
        where they would hold more than STORE_JACOBIANS_MAX numbers."""
        stored = self._train_jacobians
        if stored is None:
            if self.n_train * self.n_outputs * self.n_params > self.STORE_JACOBIANS_MAX:
                return None
            if self._jacobians_source is not None:  # a lowered copy: its source's, rounded
                stored = tuple(t.to(self.dtype) for t in self._jacobians_source._stored_train_jacobians())
            else:
                J = torch.cat([self._output_jacobians(self.params, c.inputs)
                               for c in self._chunks(self.train, self._jacobian_chunk_size(self.params, self.train))])
                stored = (J, self.model(self.params, self.train.inputs).detach())
            self._train_jacobians = stored
        return stored

    def gnvp(self, vectors: Tensor, batch: Batch | None = None, params: Tensor | None = None,
             rows: Tensor | None = None) -> Tensor:
        """G V for vectors (k, d) -> (k, d); G averaged over `batch` (default: the training set),
        or over the training examples `rows` (indices: a minibatch of the training set, which
        can reuse the training set's kept Jacobians)."""
        if rows is not None and batch is not None:
            raise ValueError("gnvp: give `batch` or `rows` (training indices), not both")
        theta = self._theta(params)
        at_base = batch is None and params is None
        batch = self.train.subset(rows) if rows is not None else self.train if batch is None else batch
        vectors = vectors.reshape(-1, theta.numel())
        self.counter.add("gnvp", len(batch) * vectors.shape[0])
        if at_base and self.stored_products(vectors.shape[0]):
            stored = self._stored_train_jacobians()
            if stored is not None:
                J, out = stored if rows is None else (stored[0][rows], stored[1][rows])
                return _jacobian_products(self, J, out, batch.targets, vectors) / len(batch)
        return self.gnvp_sum(theta, vectors, batch).detach() / len(batch)

    def hvp(self, vectors: Tensor, batch: Batch | None = None, params: Tensor | None = None) -> Tensor:
        """∇²[(1/n) Σᵢ ℓᵢ](θ) V for vectors (k, d) -> (k, d) (the full Hessian, no weight decay)."""
        theta = self._theta(params)
        batch = self.train if batch is None else batch
        vectors = vectors.reshape(-1, theta.numel())
        self.counter.add("hvp", len(batch) * vectors.shape[0])
        total = torch.zeros_like(vectors)
        for c in self._chunks(batch):
            g = grad(lambda th: self.loss(self.model(th, c.inputs), c.targets).sum())
            total += vmap(lambda v: jvp(g, (theta,), (v,))[1])(vectors).detach()
        return total / len(batch)

    def damped_gnvp(self, vectors: Tensor, damping: float | None = None) -> Tensor:
        """(G + (wd + λ) I) V over the training set; λ defaults to the problem's damping."""
        lam = self.damping if damping is None else damping
        return self.gnvp(vectors) + (self.weight_decay + lam) * vectors

    #: gauss_newton_matrix builds the per-example Jacobians (n, C, d) for at most this many numbers
    #: at a time (1 GiB in float64): an autoencoder's C = 196 outputs at d = 14k would otherwise
    #: need 22 GB for 1,000 examples
    JACOBIAN_MAX_NUMBERS = 2 ** 27

    def _gauss_newton_row_chunks(self, batch: Batch, theta: Tensor):
        """Yields, chunk by chunk of `batch`, (rows (m_c, d), examples in the chunk): each
        example's Rᵢᵀ Jᵢ with H_y,ᵢ = Rᵢ Rᵢᵀ (the output Hessian's null directions left out, so
        m_c ≤ chunk · C), so that Σᵢ Jᵢᵀ H_y,ᵢ Jᵢ = Σ rowsᵀ rows."""
        d = theta.numel()
        size = self._jacobian_chunk_size(theta, batch)
        stored = (self._stored_train_jacobians() if batch is self.train and theta is self.params
                  and self._reuses_weights() else None)
        for start, c in zip(range(0, len(batch), size), self._chunks(batch, size)):
            if stored is not None:  # the kept Jacobians, computed in the same chunks
                J, out = stored[0][start:start + size], stored[1][start:start + size]
            else:
                J = self._output_jacobians(theta, c.inputs)  # (n, C, d)
                out = self.model(theta, c.inputs).detach()
            H = output_hessians(self.loss, out, c.targets)  # (n, C, C)
            root = psd_sqrt(H, drop_null=True)  # H = R Rᵀ, R (n, C, rank)
            yield torch.einsum("ncd,nce->ned", J, root).reshape(-1, d), len(c)  # rows Rᵀ J

    def gauss_newton_rows(self, batch: Batch | None = None, params: Tensor | None = None) -> Tensor:
        """F (m, d) with G = Fᵀ F / n over `batch` (default: training set), m ≤ n·C rows: the
        factor of G that a kernel (Woodbury) solve needs when m < d. Costs n Jacobians, counted
        as gauss_newton_matrix's."""
        theta = self._theta(params)
        batch = self.train if batch is None else batch
        self.counter.add("gnvp", len(batch) * theta.numel())  # the Jacobians of gauss_newton_matrix
        return torch.cat([rows for rows, _ in self._gauss_newton_row_chunks(batch, theta)])

    def gauss_newton_matrix(self, batch: Batch | None = None, params: Tensor | None = None,
                            dtype: torch.dtype | None = None) -> Tensor:
        """The dense G (d, d) over `batch` (default: training set). Costs n·C·d² flops; over the
        training set at θˢ on a weight-reusing net, from the kept Jacobians (`_reuses_weights`).
        dtype: G summed in this dtype (float32: each chunk's rows rounded, then summed at about
        twice the float64 speed; for a preconditioner), default the problem's."""
        theta = self._theta(params)
        batch = self.train if batch is None else batch
        d = theta.numel()
        self.counter.add("gnvp", len(batch) * d)  # equivalent to d products
        G = torch.zeros(d, d, dtype=dtype or theta.dtype, device=theta.device)
        start = last = time.perf_counter()
        done = 0
        for rows, n in self._gauss_newton_row_chunks(batch, theta):
            add_gram_(G, rows.to(G.dtype))
            done += n
            if time.perf_counter() - last > 10 and done < len(batch):  # progress of a long build only
                last, elapsed = time.perf_counter(), time.perf_counter() - start
                log.info("%s dense Gauss-Newton matrix (d = %d): %d/%d examples, %.0f s, about %.0f s left",
                         self.task, d, done, len(batch), elapsed, elapsed * (len(batch) - done) / done)
        return G / len(batch)


def _jacobian_products(problem: Problem, J: Tensor, out: Tensor, targets: Tensor, vectors: Tensor) -> Tensor:
    """Σᵢ Jᵢᵀ H_y,ᵢ Jᵢ v for Jacobians J (n, C, d) at outputs `out` (n, C) and vectors (k, d)
    -> (k, d): V Jᵀ and (H J V)ᵀ J as matrix products, both with the k vectors as rows (the
    layout MKL runs fastest: one thread, float64, J of 10,000 × 9,326 and k = 40, V Jᵀ took
    0.21 s against 0.52 s for (J Vᵀ)ᵀ)."""
    n, C, d = J.shape
    rows = J.reshape(n * C, d)
    JV = (vectors @ rows.T).reshape(-1, n, C)  # (k, n, C)
    HJV = vmap(lambda u: problem._output_hvp(out, targets, u))(JV)
    return HJV.reshape(-1, n * C) @ rows


def output_hvp(loss: LossFn, outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
    """H_y v: the Hessian of Σᵢ L(yᵢ, tᵢ) in the outputs (n, C) applied to v (n, C) -> (n, C); in
    closed form where the loss has one (`loss.output_hvp`, tasks.losses), else by autodiff (a jvp
    of the output gradient)."""
    closed_form = getattr(loss, "output_hvp", None)
    if closed_form is not None:
        return closed_form(outputs, targets, v)
    return jvp(grad(lambda o: loss(o, targets).sum()), (outputs,), (v,))[1]


def output_hessians(loss: LossFn, outputs: Tensor, targets: Tensor) -> Tensor:
    """∇²_y L(yᵢ, tᵢ) for each example: outputs (n, C) -> (n, C, C); from the closed-form
    Hessian–vector product on the C unit vectors where the loss has one, else by autodiff."""
    if getattr(loss, "output_hvp", None) is not None:
        eye = torch.eye(outputs.shape[1], dtype=outputs.dtype, device=outputs.device)
        columns = vmap(lambda e: output_hvp(loss, outputs, targets, e.expand_as(outputs)))(eye)  # (C, n, C)
        return columns.permute(1, 2, 0).detach()  # H[i, :, c] = H_i e_c
    one = lambda y, t: loss(y.unsqueeze(0), t.unsqueeze(0))[0]
    return vmap(torch.func.hessian(one))(outputs, targets).detach()


#: eigh returns the exact null eigenvalue of a softmax Hessian as ±(a few)·C·eps·max eigenvalue,
#: and how many depends on the CPU: up to 3.7 C·eps on an Intel Xeon where an AMD EPYC had one
#: above C·eps, so that a cutoff of C·eps dropped the null column on one and kept it on the
#: other (tests/test_operators.py). This margin makes the drop the same on both.
NULL_CUTOFF = 1000


def psd_sqrt(H: Tensor, drop_null: bool = False) -> Tensor:
    """R with H = R Rᵀ for a batch of symmetric PSD matrices (n, C, C) -> (n, C, C).

    drop_null: leave out the columns whose eigenvalue is at most NULL_CUTOFF·C·eps·max eigenvalue
    in every matrix of the batch (the softmax Hessian's null direction 1) -> (n, C, r), r ≤ C;
    R Rᵀ changes by at most that relative amount (7e-13 for C = 3)."""
    w, Q = torch.linalg.eigh(H)  # ascending eigenvalues
    R = Q * w.clamp_min(0).sqrt().unsqueeze(-2)
    if not drop_null:
        return R
    cutoff = w.amax(-1, keepdim=True).clamp_min(0) * NULL_CUTOFF * H.shape[-1] * torch.finfo(H.dtype).eps
    return R[..., (w > cutoff).any(0).nonzero().flatten()]


def flat_norm(x: Tensor) -> Tensor:
    """Row norms of (k, d) -> (k,)."""
    return torch.linalg.vector_norm(x, dim=-1)


__all__ = ["Batch", "FunctionalModel", "EvaluationCounter", "Problem", "TimeBudgetExceeded", "output_hessians",
           "output_hvp", "psd_sqrt", "flat_norm"]
