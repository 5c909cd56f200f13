"""Accumulated micro-batches give the large batch's gradient (float64), and under DDP the all-reduce runs once
per accumulated step (2 gloo processes)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from stochopt.training import accumulate_gradients, batch_size, split_batch
from tests.conftest import gloo_group


def make_model(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def make_data(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def big_batch_grads(model, x, y):
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("n, micro", [(32, 8), (30, 8), (7, 3), (5, 5), (5, 16)])
def test_micro_batches_equal_the_large_batch(n, micro):
    model = make_model()
    x, y = make_data(n)
    expected = big_batch_grads(model, x, y)
    full_loss = nn.functional.cross_entropy(model(x), y)
    model.zero_grad()
    loss = accumulate_gradients(
        model, split_batch((x, y), micro), lambda b: nn.functional.cross_entropy(model(b[0]), b[1])
    )
    assert loss.item() == pytest.approx(full_loss.item(), rel=1e-12)
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)


def test_given_sizes_and_dict_batches():
    model = make_model()
    x, y = make_data(10)
    expected = big_batch_grads(model, x, y)
    model.zero_grad()
    batches = [{"x": x[:7], "y": y[:7]}, {"x": x[7:], "y": y[7:]}]
    accumulate_gradients(model, batches, lambda b: nn.functional.cross_entropy(model(b["x"]), b["y"]), sizes=[7, 3])
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)


def test_split_batch_keeps_structure():
    x, y = make_data(10)
    parts = list(split_batch({"x": x, "y": y, "tag": "train"}, 4))
    assert [batch_size(p) for p in parts] == [4, 4, 2] and parts[0]["tag"] == "train"
    assert torch.equal(torch.cat([p["x"] for p in parts]), x)


ONES = [torch.ones(2, 5, dtype=torch.float64)]


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m: accumulate_gradients(m, [], lambda b: b), ValueError, "micro_batches is empty"),
        (lambda m: accumulate_gradients(m, ONES, lambda b: m(b)), TypeError, "0-d tensor"),
        (lambda m: accumulate_gradients(m, ONES, lambda b: m(b).sum(), sizes=[1, 1]), ValueError,
         "sizes has 2 entries"),
        (lambda m: accumulate_gradients(m, ONES, lambda b: m(b).sum(), sizes=[0]), ValueError,
         r"sizes\[0\]"),
        (lambda m: list(split_batch(torch.ones(4), 0)), ValueError, "micro_batch_size"),
        (lambda m: batch_size("text"), TypeError, "cannot tell the number of examples"),
    ],
)  # fmt: skip
def test_bad_input_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call(make_model())


def _ddp_worker(rank: int, world: int, init_file: str, results: str) -> None:
    with gloo_group(rank, world, init_file):
        model = make_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        calls = []

        def counting_hook(state, bucket):
            calls.append(bucket.index())
            return allreduce_hook(state, bucket)

        ddp.register_comm_hook(dist.group.WORLD, counting_hook)
        x, y = make_data(24, seed=10)  # the global batch; this rank takes its half
        local = slice(12 * rank, 12 * (rank + 1))
        steps = []
        for _ in range(3):
            model.zero_grad()
            before = len(calls)
            accumulate_gradients(
                ddp, split_batch((x[local], y[local]), 5), lambda b: nn.functional.cross_entropy(ddp(b[0]), b[1])
            )
            steps.append(len(calls) - before)
        grads = [p.grad.clone() for p in model.parameters()]
        if rank == 0:
            reference = make_model()
            expected = big_batch_grads(reference, x, y)
            torch.save({"hook_calls": steps, "grads": grads, "expected": expected}, results)


def test_ddp_all_reduces_once_per_accumulated_step(tmp_path):
    results = str(tmp_path / "results.pt")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    out = torch.load(results)
    # 3 micro-batches (5, 5, 2 examples) per step, one bucket: one all-reduce per step, not three
    assert out["hook_calls"] == [1, 1, 1]
    for g, e in zip(out["grads"], out["expected"]):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)
