"""The compression hooks on 2 and on 4 gloo processes, checked against plain all-reduce and against reference loops
written here from the papers' equations (float64).

A probe module's loss is sum_p <p, x_p>, so each rank's gradient is exactly the input it was given; tiny buckets
give several buckets per step, and DDP's bucket rebuild after the first step is exercised too."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from stochopt.distributed import CommStats, PowerSGDState, TopKState, allreduce_bytes, compression_hook
from stochopt.distributed.state import index_bits, pack_bits, pack_indices, unpack_bits, unpack_indices
from tests.conftest import gloo_group
from tests.distributed.conftest import START

SHAPES = [(40, 30), (30,), (20, 40), (7,)]
STEPS = 6
SMALL_BUCKETS = 0.01  # MB: the 40x30 float64 matrix alone fills a bucket
CASES = {
    # name: (compression, options, bucket_cap_mb)
    "dense": (None, {}, SMALL_BUCKETS),
    "none": ("none", {}, SMALL_BUCKETS),
    "topk_1": ("topk", {"density": 1.0}, SMALL_BUCKETS),
    "randomk_1": ("randomk", {"density": 1.0}, SMALL_BUCKETS),
    "topk_small_buckets": ("topk", {"density": 0.05}, SMALL_BUCKETS),
    "randomk_small_buckets": ("randomk", {"density": 0.05, "seed": 3}, SMALL_BUCKETS),
    "sign": ("sign", {}, SMALL_BUCKETS),
    "sign_one_bucket": ("sign", {}, 25),
    "topk": ("topk", {"density": 0.05}, 25),
    "topk_no_feedback": ("topk", {"density": 0.05, "error_feedback": False}, 25),
    "dgc": ("topk", {"density": 0.05, "momentum": 0.9, "warmup_steps": 3, "warmup_density": 0.5}, 25),
    "powersgd": ("powersgd", {"rank": 2, "start_iter": 2, "min_compression_rate": 1.5}, 25),
}


class Probe(nn.Module):
    """loss = sum_p <p, x_p>: the gradient of p is x_p."""

    def __init__(self) -> None:
        super().__init__()
        self.ps = nn.ParameterList([nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in SHAPES])

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return sum((p * x).sum() for p, x in zip(self.ps, xs))


def inputs(step: int, rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * step + rank)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]


def _worker(rank: int, world: int, cases: list[str], init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # two or more ranks on two cores
    with gloo_group(rank, world, init_file):
        out = {}
        for case in cases:
            name, options, cap = CASES[case]
            model = Probe()
            ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=cap)
            state = None
            if name is not None:
                state, hook = compression_hook(name, **options)
                ddp.register_comm_hook(state, hook)
            outputs, sent, dense = [], [], []
            for t in range(STEPS):
                model.zero_grad()
                ddp(inputs(t, rank)).backward()
                outputs.append([p.grad.clone() for p in model.ps])
                if state is not None:
                    sent.append(state.stats.last_bytes_sent)
                    dense.append(state.stats.last_dense_bytes)
            residuals = [state.residual(p).clone() for p in model.ps] if hasattr(state, "residual") else None
            out[case] = {"outputs": outputs, "residuals": residuals, "sent": sent, "dense": dense}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


FOUR_RANK_CASES = ["dense", "none", "topk_1", "randomk_1", "topk_small_buckets", "randomk_small_buckets", "sign",
                   "topk"]  # fmt: skip


def _run(size: int, cases: list[str], tmp) -> list[dict]:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.start_processes(_worker, args=(size, cases, str(tmp / "init"), str(tmp)), nprocs=size, start_method=START)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(size)]


@pytest.fixture(scope="module")
def runs2(tmp_path_factory):
    return _run(2, list(CASES), tmp_path_factory.mktemp("hooks2"))


@pytest.fixture(scope="module")
def runs4(tmp_path_factory):
    # 4 processes on 2 cores are slow to step together: the cases that depend on the world size
    return _run(4, FOUR_RANK_CASES, tmp_path_factory.mktemp("hooks4"))


@pytest.fixture(params=[2, 4], ids=["2 ranks", "4 ranks"])
def world(request):
    """(world size, each rank's results), for the checks that run on both."""
    return request.param, request.getfixturevalue(f"runs{request.param}")


@pytest.fixture
def two(runs2):
    return 2, runs2


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


D = sum(math.prod(s) for s in SHAPES)


@pytest.mark.parametrize("case", ["none", "topk_1", "randomk_1"])
def test_density_one_is_exactly_the_plain_all_reduce(world, case):
    size, runs = world
    for rank in range(size):
        for got, want in zip(runs[rank][case]["outputs"], runs[rank]["dense"]["outputs"]):
            for g, w in zip(got, want):
                if size == 2:  # a + b is the same in either order: bitwise equal
                    assert torch.equal(g, w)
                else:  # gloo's ring sums each chunk in its own rank order: equal to the rounding of 4 terms
                    torch.testing.assert_close(g, w, rtol=0, atol=1e-15)
            assert not torch.equal(flat(want), flat(inputs(0, rank)))  # it averaged something


@pytest.mark.parametrize("case", ["topk_small_buckets", "randomk_small_buckets", "sign", "topk"])
def test_error_feedback_sent_plus_residual_is_the_sum_of_gradients(world, case):
    size, runs = world
    # every rank's sum over steps of what it sent, plus its residual, is the sum of its gradients; summed over
    # ranks: W * sum_t (average received at t) + sum_r e_r == sum_r sum_t g_t^r
    received = sum(flat(o) for o in runs[0][case]["outputs"])
    residuals = sum(flat(runs[r][case]["residuals"]) for r in range(size))
    gradients = sum(flat(inputs(t, r)) for t in range(STEPS) for r in range(size))
    torch.testing.assert_close(size * received + residuals, gradients, rtol=0, atol=1e-12)
    assert residuals.abs().sum() > 1.0  # something was held back
    for rank in range(1, size):  # every rank applied the same averaged gradient
        assert torch.equal(flat(runs[rank][case]["outputs"][-1]), flat(runs[0][case]["outputs"][-1]))


def reference_topk(size, density, momentum=0.0, feedback=True, warmup=0, warmup_density=0.25):
    """Stich et al. 2018 (memory), Lin et al. 2018 (momentum correction and masking, density warm-up)."""
    u = [torch.zeros(D, dtype=torch.float64) for _ in range(size)]
    e = [torch.zeros(D, dtype=torch.float64) for _ in range(size)]
    outputs = []
    for t in range(STEPS):
        rho = density if t >= warmup else warmup_density * (density / warmup_density) ** (t / warmup)
        k = math.ceil(rho * D)
        total = torch.zeros(D, dtype=torch.float64)
        for r in range(size):
            g = flat(inputs(t, r))
            u[r] = momentum * u[r] + g if momentum else g
            a = e[r] + u[r] if feedback else u[r].clone()
            chosen = torch.argsort(a.abs(), descending=True)[:k]
            sent = torch.zeros(D, dtype=torch.float64)
            sent[chosen] = a[chosen]
            e[r] = a - sent if feedback else torch.zeros(D, dtype=torch.float64)
            if momentum:
                u[r][chosen] = 0.0
            total += sent
        outputs.append(total / size)
    return outputs, e


@pytest.mark.parametrize(
    "case, kwargs",
    [("topk", dict(density=0.05)), ("topk_no_feedback", dict(density=0.05, feedback=False)),
     ("dgc", dict(density=0.05, momentum=0.9, warmup=3, warmup_density=0.5))],
)  # fmt: skip
def test_topk_matches_the_reference_loop(two, case, kwargs):
    size, runs = two
    want, residuals = reference_topk(size, **kwargs)
    for got, w in zip(runs[0][case]["outputs"], want):  # top-k of a bucket does not depend on its layout
        torch.testing.assert_close(flat(got), w, rtol=1e-15, atol=1e-15)
    if runs[0][case]["residuals"] is not None:
        for r in range(size):
            torch.testing.assert_close(flat(runs[r][case]["residuals"]), residuals[r], rtol=0, atol=1e-15)


def test_sign_matches_the_reference_loop(two):
    """Karimireddy et al. 2019: a = e + g; C(a) = ||a||_1 / d * sign(a) per tensor; e = a - C(a)."""
    size, runs = two
    e = [[torch.zeros(s, dtype=torch.float64) for s in SHAPES] for _ in range(size)]
    for t in range(STEPS):
        total = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
        for r in range(size):
            for i, g in enumerate(inputs(t, r)):
                a = e[r][i] + g
                c = a.abs().sum() / a.numel() * torch.where(a >= 0, torch.ones_like(a), -torch.ones_like(a))
                e[r][i] = a - c
                total[i] += c
        for got, w in zip(runs[0]["sign"]["outputs"][t], total):
            torch.testing.assert_close(got, w / size, rtol=1e-14, atol=1e-15)


def test_bytes_counted_as_they_travel(world):
    size, runs = world
    dense = allreduce_bytes(8 * D, size)
    assert dense == 2 * (size - 1) * 8 * D // size
    k = math.ceil(0.05 * D)
    topk = (size - 1) * (8 * k + math.ceil(k * math.ceil(math.log2(D)) / 8))  # float64 values, packed indices
    assert runs[0]["topk"]["sent"] == [topk] * STEPS and runs[0]["topk"]["dense"] == [dense] * STEPS
    assert runs[0]["none"]["sent"] == [dense] * STEPS


def test_powersgd_and_sign_bytes(two):
    size, runs = two
    dense = allreduce_bytes(8 * D, size)
    # PowerSGD after start_iter: every matrix as P (n x 2) and Q (m x 2), vectors whole, all in float64
    low_rank = 8 * (2 * (40 + 30) + 2 * (20 + 40) + 30 + 7)
    assert runs[0]["powersgd"]["sent"] == [dense, dense] + [allreduce_bytes(low_rank, size)] * (STEPS - 2)
    # one bucket: a scale per tensor (float64) and one bit per entry, packed
    assert runs[0]["sign_one_bucket"]["sent"] == [(size - 1) * (8 * len(SHAPES) + math.ceil(D / 8))] * STEPS


def test_powersgd_changes_the_gradient_only_after_start_iter(two):
    _, runs = two
    for t in range(2):
        assert torch.equal(flat(runs[0]["powersgd"]["outputs"][t]), flat(runs[0]["dense"]["outputs"][t]))
    assert not torch.allclose(flat(runs[0]["powersgd"]["outputs"][2]), flat(runs[0]["dense"]["outputs"][2]))


def test_wire_packing_round_trips():
    gen = torch.Generator().manual_seed(0)
    bits = torch.rand(37, generator=gen) > 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == 5
    assert torch.equal(unpack_bits(packed, 37), bits)
    for numel in (1, 2, 3, 1000, 100_003):
        indices = torch.randperm(numel, generator=gen)[: min(numel, 50)]
        packed = pack_indices(indices, numel)
        assert packed.numel() == math.ceil(indices.numel() * index_bits(numel) / 8)
        assert torch.equal(unpack_indices(packed, indices.numel(), numel), indices)
    assert [index_bits(n) for n in (1, 2, 3, 4, 5, 65536, 65537)] == [1, 1, 2, 2, 3, 16, 17]


def test_stats_and_ring_counts():
    assert allreduce_bytes(1000, 1) == 0 and allreduce_bytes(1000, 2) == 1000 and allreduce_bytes(1000, 4) == 1500
    stats = CommStats()
    stats.add(10, 10, 100)
    stats.add(5, 5, 50)
    stats.end_step()
    assert (stats.steps, stats.last_bytes_sent, stats.dense_bytes, stats.compression) == (1, 15, 150, 10.0)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: compression_hook("zip"), ValueError, "unknown compression 'zip'"),
        (lambda: compression_hook("topk"), TypeError, "density"),
        (lambda: compression_hook("topk", density=0.0), ValueError, "density must be in"),
        (lambda: compression_hook("randomk", density=1.5), ValueError, "density must be in"),
        (lambda: TopKState(0.1, momentum=1.0), ValueError, "momentum"),
        (lambda: TopKState(0.1, warmup_steps=-1), ValueError, "warmup_steps"),
        (lambda: compression_hook("sign", error_feedback=1), TypeError, "error_feedback"),
        (lambda: PowerSGDState(rank=0), ValueError, "rank must be a positive int"),
    ],
)  # fmt: skip
def test_bad_options_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()
