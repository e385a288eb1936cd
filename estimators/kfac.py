"""`kfac` and `ekfac`: Kronecker-factored Gauss–Newton influence (George et al. 2018; Grosse et al. 2023).

Per nn.Linear / nn.Conv2d layer with weight W (out, in) (a bias appended as a last column, so
`in` counts a 1 appended to the activations), the layer's diagonal block of the Gauss–Newton
matrix G = (1/N) Σᵢ Σ_c vec(Gᵢ,c) vec(Gᵢ,c)ᵀ, with pseudo-gradients Gᵢ,c = Σ_t sᵢ,c,t aᵢ,tᵀ, is
approximated by

    A ⊗ S,   A = (1/N) Σᵢ (1/T) Σ_t aᵢ,t aᵢ,tᵀ  (in, in),   S = (1/N) Σᵢ Σ_c Σ_t sᵢ,c,t sᵢ,c,tᵀ  (out, out).

a are the layer's input activations; s are TRUE Gauss–Newton pseudo-gradients, not sampled labels:
for each example H_y = R Rᵀ (benchmark.problem.output_hessians, psd_sqrt) and each of the C
columns r_c of R is backpropagated from the outputs to the layer outputs, s_c = ∂(r_cᵀ f)/∂z, so
that Σ_c Jᵀ r_c r_cᵀ J = Jᵀ H_y J exactly. t runs over positions: T = 1 for an MLP; the tokens
of a sequence model's (n, T, features) layer inputs; the spatial positions of a convolution, whose
activations are the unfolded patches (torch.nn.functional.unfold), as in KFC (Grosse & Martens
2016). Positions count as extra examples for A and are summed over for S (Grosse et al. 2023;
"K-FAC-expand"), which drops the cross-position terms of G.

Inverses, with μ = wd + λ added to the Kronecker product itself (the paper's damping, NOT split
between the factors as π-damping): with A = Q_A diag(λ_A) Q_Aᵀ and S = Q_S diag(λ_S) Q_Sᵀ, a
weight-shaped gradient V (out, in) maps to

    Q_S [(Q_Sᵀ V Q_A) / (Λ + μ)] Q_Aᵀ,   Λ = λ_S λ_Aᵀ (kfac)   or   Λ = (1/N) Σᵢ,c (Q_Sᵀ Gᵢ,c Q_A)²   (ekfac),

EK-FAC's corrected eigenvalues being computed from the same pseudo-gradients in a second pass.
Parameters outside a factored layer (embeddings, layer and batch norms, anything not Linear or
Conv2d) get the damped identity: their block is (1/μ) I. Δθ₋ₘ = ε (blockwise inverse) ∇ℓₘ(θˢ).

Fitting runs forward hooks on `problem.module()` over `problem.train_loader(batch_size)`; it
reports its own evaluations to `problem.counter` (a forward per example, a backward per example
and output column as "gradient"), which the problem does not count for library code. The fit
costs N·C backward passes: cheap for classifiers, heavy for a language model (C = T·vocab).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.problem import Problem, output_hessians, psd_sqrt

from .base import ParameterEstimator, effective_damping

#: elements of one (pairs, out, in) intermediate of EK-FAC's corrected eigenvalues
_EIGENVALUE_CHUNK = 1 << 22


@dataclass
class _Layer:
    """One factored layer: where its weight (and bias) lie in the flat θ, and its factors."""

    module: nn.Module
    weight: slice  # the weight's coordinates in θ, (out · in_w) of them, row-major (out, in_w)
    bias: slice | None
    out: int
    A: Tensor | None = None  # (in, in); in = in_w (+1 for a bias)
    S: Tensor | None = None  # (out, out)
    Q_A: Tensor | None = None
    Q_S: Tensor | None = None
    eigenvalues: Tensor | None = None  # Λ (out, in)

    def activations(self, x: Tensor) -> Tensor:
        """Layer inputs -> (n, T, in): unfolded patches for a convolution, a 1 appended for a bias."""
        m = self.module
        if isinstance(m, nn.Conv2d):
            a = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride).transpose(1, 2)
        else:
            a = x.reshape(x.shape[0], -1, x.shape[-1])
        if self.bias is not None:
            a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
        return a

    def pseudo_gradients(self, ds: Tensor) -> Tensor:
        """∂(r_cᵀ f)/∂z for k columns, (k, *z.shape) -> (k, n, T, out)."""
        if isinstance(self.module, nn.Conv2d):
            return ds.flatten(3).transpose(2, 3)
        return ds.reshape(ds.shape[0], ds.shape[1], -1, ds.shape[-1])

    def block(self, vectors: Tensor) -> Tensor:
        """The layer's part of flat vectors (k, d) -> (k, out, in)."""
        k = vectors.shape[0]
        V = vectors[:, self.weight].reshape(k, self.out, -1)
        if self.bias is not None:
            V = torch.cat([V, vectors[:, self.bias].unsqueeze(-1)], dim=-1)
        return V

    def write(self, target: Tensor, V: Tensor) -> None:
        """The inverse of `block`: V (k, out, in) into the flat rows of target (k, d)."""
        k = V.shape[0]
        if self.bias is not None:
            target[:, self.bias] = V[..., -1]
            V = V[..., :-1]
        target[:, self.weight] = V.reshape(k, -1)


def _check_supported(name: str, m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d) and (m.groups != 1 or isinstance(m.padding, str) or m.padding_mode != "zeros"):
        raise ValueError(f"K-FAC supports Conv2d with groups=1, numeric zero padding; layer {name!r} has groups="
                         f"{m.groups}, padding={m.padding!r}, padding_mode={m.padding_mode!r}")


class KFAC(ParameterEstimator):
    """K-FAC influence; `eigenvalue_correction=True` is EK-FAC (registered as `ekfac`).

    batch_size: training examples a forward pass; column_chunk: output columns of R a batched backward."""

    description = ("K-FAC (EK-FAC with eigenvalue_correction): Kronecker-factored Gauss-Newton per Linear/Conv2d "
                   "layer from true GGN pseudo-gradients")

    def __init__(self, damping: float | None = None, eigenvalue_correction: bool = False, batch_size: int = 64,
                 column_chunk: int = 64):
        self.damping = damping
        self.eigenvalue_correction = eigenvalue_correction
        self.batch_size = batch_size
        self.column_chunk = column_chunk

    # ---- fit -------------------------------------------------------------------------------
    def _layers(self, problem: Problem, module: nn.Module) -> list[_Layer]:
        offsets, start = {}, 0
        for name, n in zip(problem.model.names, problem.model.numels):
            offsets[name] = slice(start, start + n)
            start += n
        layers = []
        for name, m in module.named_modules():
            prefix = f"{name}." if name else ""
            if not isinstance(m, (nn.Linear, nn.Conv2d)) or prefix + "weight" not in offsets:
                continue  # a tied weight is handled where it is named
            _check_supported(name, m)
            bias = offsets.get(prefix + "bias") if m.bias is not None else None
            layers.append(_Layer(m, offsets[prefix + "weight"], bias, m.weight.shape[0]))
        return layers

    def _passes(self, problem: Problem, module: nn.Module, layers: list[_Layer]):
        """For each training batch: [(activations (n, T, in), pseudo-gradients (k, n, T, out))
        per layer] for each chunk of k output columns of R."""
        captured: dict[int, tuple[Tensor, Tensor]] = {}

        def hook(index):
            def record(m, inputs, output):
                if index in captured:
                    raise ValueError("K-FAC: a factored layer is called more than once per forward pass")
                captured[index] = (inputs[0].detach(), output)
            return record

        handles = [layer.module.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
        try:
            for inputs, targets in problem.train_loader(self.batch_size):
                captured.clear()
                out = module(inputs)
                n, C = out.shape
                if len(captured) < len(layers):
                    raise ValueError("K-FAC: a Linear/Conv2d layer of the module is not called by its forward pass")
                problem.counter.add("forward", n)
                problem.counter.add("gradient", n * C)
                R = psd_sqrt(output_hessians(problem.loss, out.detach(), targets))  # (n, C, C), H = R Rᵀ
                acts = [layer.activations(captured[i][0]) for i, layer in enumerate(layers)]
                zs = [captured[i][1] for i in range(len(layers))]
                for c0 in range(0, C, self.column_chunk):
                    cols = R[:, :, c0:c0 + self.column_chunk].permute(2, 0, 1)  # (k, n, C)
                    last = c0 + self.column_chunk >= C
                    ds = torch.autograd.grad(out, zs, grad_outputs=cols, retain_graph=not last,
                                             is_grads_batched=True, allow_unused=True, materialize_grads=True)
                    yield [(a, layer.pseudo_gradients(g)) for layer, a, g in zip(layers, acts, ds)], c0 == 0
        finally:
            for h in handles:
                h.remove()

    def fit(self, problem: Problem) -> "KFAC":
        self.mu_ = effective_damping(problem, self.damping)
        module = problem.module()
        layers = self._layers(problem, module)
        N = problem.n_train
        for layer in layers:
            layer.A = layer.S = 0
        for per_layer, first in self._passes(problem, module, layers):
            for layer, (a, s) in zip(layers, per_layer):
                if first:
                    layer.A = layer.A + torch.einsum("nti,ntj->ij", a, a) / a.shape[1]
                layer.S = layer.S + torch.einsum("knto,kntp->op", s, s)
        for layer in layers:
            layer.A, layer.S = layer.A / N, layer.S / N
            lam_A, layer.Q_A = torch.linalg.eigh(layer.A)
            lam_S, layer.Q_S = torch.linalg.eigh(layer.S)
            layer.eigenvalues = torch.outer(lam_S.clamp_min(0), lam_A.clamp_min(0))
        if self.eigenvalue_correction:
            for layer in layers:
                layer.eigenvalues = torch.zeros_like(layer.eigenvalues)
            for per_layer, _ in self._passes(problem, module, layers):
                for layer, (a, s) in zip(layers, per_layer):
                    layer.eigenvalues += self._squared_rotated(layer, a, s) / N
        self.layers_ = layers
        self.problem_ = problem
        return self

    @staticmethod
    def _squared_rotated(layer: _Layer, a: Tensor, s: Tensor) -> Tensor:
        """Σ over examples and columns of (Q_Sᵀ Gᵢ,c Q_A)², Gᵢ,c = Σ_t sᵢ,c,t aᵢ,tᵀ -> (out, in)."""
        a, s = a @ layer.Q_A, s @ layer.Q_S  # (n, T, in), (k, n, T, out)
        if a.shape[1] == 1:  # rank one: (s aᵀ)² = s² (a²)ᵀ
            return torch.einsum("kno,ni->oi", s[:, :, 0] ** 2, a[:, 0] ** 2)
        k, n, _, out = s.shape
        step = max(1, _EIGENVALUE_CHUNK // (k * out * a.shape[-1]))
        total = 0
        for i in range(0, n, step):
            total = total + (torch.einsum("knto,nti->knoi", s[:, i:i + step], a[i:i + step]) ** 2).sum((0, 1))
        return total

    # ---- scoring ---------------------------------------------------------------------------
    def inverse_curvature(self, vectors: Tensor) -> Tensor:
        """The blockwise (K-FAC block + μI)⁻¹ applied to flat vectors (k, d) -> (k, d);
        parameters of no factored layer get 1/μ."""
        out = vectors / self.mu_
        for layer in self.layers_:
            V = layer.Q_S.T @ layer.block(vectors) @ layer.Q_A
            layer.write(out, layer.Q_S @ (V / (layer.eigenvalues + self.mu_)) @ layer.Q_A.T)
        return out

    def parameter_change(self, train_idx: Tensor) -> Tensor:
        p = self.problem
        return p.epsilon * self.inverse_curvature(p.train_gradients(train_idx))

