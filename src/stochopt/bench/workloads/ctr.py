"""Click-through-rate prediction with a large embedding table (DLRM-like; Naumov et al., 2019, "Deep Learning
Recommendation Model for Personalization and Recommendation Systems") on synthetic clicks whose categorical features
follow Zipf's law, so that most rows of the table are rarely seen: the setting where sparse gradients and a lazy
optimizer (``stochopt.LazyAdam``) matter."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from stochopt.bench.workloads.base import Batch, Workload
from stochopt.bench.workloads.common import check_batch_size, check_positive_ints, seeded, stored_target

TRAIN_STREAM = 1_000_003  # training streams are seeded TRAIN_STREAM + seed, apart from the problem's own seed 0


class DLRM(nn.Module):
    """Bottom MLP on the dense features, one embedding table for all categorical fields (rows offset per field),
    the pairwise dot products of all F + 1 vectors, and a top MLP on [dense vector, dot products]."""

    def __init__(self, rows: int, fields: int, dense: int, dim: int, sparse: bool) -> None:
        super().__init__()
        self.embedding = nn.Embedding(rows, dim, sparse=sparse)
        nn.init.normal_(self.embedding.weight, std=0.1)  # N(0, 1) rows would make the dot products explode
        self.bottom = nn.Sequential(nn.Linear(dense, 32), nn.ReLU(), nn.Linear(32, dim), nn.ReLU())
        pairs = (fields + 1) * fields // 2
        self.top = nn.Sequential(nn.Linear(dim + pairs, 64), nn.ReLU(), nn.Linear(64, 1))
        self.pairs = torch.triu_indices(fields + 1, fields + 1, offset=1)

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        d = self.bottom(dense)
        vectors = torch.cat([d.unsqueeze(1), self.embedding(ids)], dim=1)  # (batch, F + 1, dim)
        dots = (vectors @ vectors.transpose(1, 2))[:, self.pairs[0], self.pairs[1]]
        return self.top(torch.cat([d, dots], dim=1)).squeeze(-1)


class CTR(Workload):
    r"""Synthetic click log: ``fields`` categorical features with ``rows_per_field`` values each (one table of
    ``fields * rows_per_field`` rows, 131,072 by default) and 4 Gaussian dense features. Value ranks are drawn with
    Zipf probabilities :math:`p(r) \propto r^{-s}` and mapped to ids by a fixed random permutation. Clicks are
    Bernoulli with a hidden teacher's probability

    .. math:: \sigma\Big(b + w^\top x + \sum_f a_f[i_f] + \sum_{f<g} \langle u_f[i_f], u_g[i_g] \rangle\Big),

    per-value effects :math:`a` and low-rank interactions :math:`u` drawn once (seed 0). Training batches are fresh
    draws from a seeded stream (an endless log); the validation set is fixed. The metric is the validation log loss;
    ``bayes_log_loss`` (the teacher's own) is the floor no model can beat.
    """

    name = "ctr"
    metric = "validation log loss"
    target = stored_target("ctr")
    max_steps = 600
    eval_every = 30
    batch_size = 256
    description = "DLRM-like click model, 131k-row embedding table, Zipf-distributed synthetic features"

    def __init__(
        self, fields: int = 8, rows_per_field: int = 16384, dim: int = 8, zipf: float = 1.2, val_size: int = 8192
    ) -> None:
        check_positive_ints(fields=fields, rows_per_field=rows_per_field, dim=dim, val_size=val_size)
        if not zipf > 0:
            raise ValueError(f"zipf exponent must be > 0, got {zipf!r}")
        self.fields, self.rows_per_field, self.dim, self.zipf, self.val_size = (
            fields,
            rows_per_field,
            dim,
            zipf,
            val_size,
        )
        self.dense_features = 4

    def setup(self) -> None:
        gen = torch.Generator().manual_seed(0)
        ranks = torch.arange(1, self.rows_per_field + 1, dtype=torch.float64)
        self.probs = (ranks**-self.zipf / (ranks**-self.zipf).sum()).expand(self.fields, -1).contiguous()
        self.rank_to_id = torch.stack([torch.randperm(self.rows_per_field, generator=gen) for _ in range(self.fields)])
        self.offsets = torch.arange(self.fields) * self.rows_per_field
        rows = self.fields * self.rows_per_field
        self.effects = 0.7 * torch.randn(rows, generator=gen)
        self.factors = 0.5 * torch.randn(rows, 4, generator=gen)
        self.dense_weight = 0.5 * torch.randn(self.dense_features, generator=gen)
        self.bias = -1.5  # about one click in five
        dense, ids, self.val_clicks, p = self._draw(self.val_size, gen)
        self.val_inputs = (dense, ids)
        self.bayes_log_loss = float(F.binary_cross_entropy(p, self.val_clicks))

    def _draw(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        """``n`` samples: dense features, table rows (batch, fields), clicks and the teacher's click probability."""
        dense = torch.randn(n, self.dense_features, generator=gen)
        ranks = torch.multinomial(self.probs, n, replacement=True, generator=gen)  # (fields, n)
        ids = (torch.gather(self.rank_to_id, 1, ranks) + self.offsets.unsqueeze(1)).T.contiguous()
        u = self.factors[ids]  # (n, fields, 4)
        pair_sum = 0.5 * (u.sum(1).square().sum(1) - u.square().sum((1, 2)))  # sum over f < g of <u_f, u_g>
        p = torch.sigmoid(self.bias + dense @ self.dense_weight + self.effects[ids].sum(1) + pair_sum)
        clicks = torch.bernoulli(p, generator=gen)
        return dense, ids, clicks, p

    def init_model(self, seed: int, sparse: bool = False) -> nn.Module:
        with seeded(seed):
            return DLRM(self.fields * self.rows_per_field, self.fields, self.dense_features, self.dim, sparse)

    def train_batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        check_batch_size(batch_size)
        gen = torch.Generator().manual_seed(TRAIN_STREAM + seed)
        while True:
            dense, ids, clicks, _ = self._draw(batch_size, gen)
            yield dense, ids, clicks

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        dense, ids, clicks = batch
        return F.binary_cross_entropy_with_logits(model(dense, ids), clicks)

    def evaluate(self, model: nn.Module) -> float:
        return float(self.loss(model, (*self.val_inputs, self.val_clicks)))
