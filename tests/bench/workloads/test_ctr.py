"""ctr: a 100k+-row table, Zipf-distributed features, sparse gradients on request, and LazyAdam training it."""

from __future__ import annotations

import functools

import torch

import stochopt
from stochopt.bench.workloads import load_workload


@functools.cache
def workload():
    w = load_workload("ctr")
    w.setup()
    return w


def test_feature_frequencies_follow_zipf():
    w = workload()
    assert w.fields * w.rows_per_field >= 100_000
    batches = w.train_batches(5000, 0)
    ids = torch.cat([next(batches)[1] for _ in range(10)])  # 50,000 rows x fields
    counts = torch.bincount(ids[:, 0], minlength=w.rows_per_field).double()  # field 0 occupies rows [0, V)
    ranked = counts[w.rank_to_id[0, :3]] / len(ids)  # empirical frequency of the values of ranks 1, 2, 3
    harmonic = (torch.arange(1, w.rows_per_field + 1, dtype=torch.float64) ** -w.zipf).sum()
    expected = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) ** -w.zipf / harmonic
    torch.testing.assert_close(ranked, expected, rtol=0.06, atol=0)
    assert (counts > 0).sum() < 0.5 * w.rows_per_field  # most rows are not seen in 50,000 draws: a long tail
    assert ids[:, 3].min() >= 3 * w.rows_per_field and ids[:, 3].max() < 4 * w.rows_per_field


def test_sparse_model_has_the_same_init_and_sparse_embedding_gradients():
    w = workload()
    dense, sparse = w.init_model(5), w.init_model(5, sparse=True)
    for a, b in zip(dense.parameters(), sparse.parameters()):
        assert torch.equal(a, b)
    batch = next(w.train_batches(64, 0))
    w.loss(sparse, batch).backward()
    w.loss(dense, batch).backward()
    assert sparse.embedding.weight.grad.is_sparse and not dense.embedding.weight.grad.is_sparse
    torch.testing.assert_close(sparse.embedding.weight.grad.to_dense(), dense.embedding.weight.grad)


def test_lazyadam_on_sparse_gradients_learns_the_clicks():
    w = workload()
    model = w.init_model(0, sparse=True)
    optimizer = stochopt.LazyAdam(model.parameters(), lr=3e-3)
    batches = w.train_batches(w.batch_size, 0)
    with torch.no_grad():
        before = w.evaluate(model)
    for _ in range(150):
        loss = w.loss(model, next(batches))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = w.evaluate(model)
    # the constant predictor of a 30% click rate has log loss 0.61; the teacher's own is the floor
    assert w.bayes_log_loss < after < 0.57 < before, (before, after, w.bayes_log_loss)
