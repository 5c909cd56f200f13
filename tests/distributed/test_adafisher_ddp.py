"""AdaFisher under DDP, 2 gloo processes (one spawn for all cases): with its factors summed over the ranks it
equals single-process AdaFisher on the global batch (float64, 25 steps; on the default group and on one passed
explicitly); with ``process_group=False`` each rank's factors come from its own half and the replicas drift apart.
The bytes reduced per step are counted."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import stochopt
from tests.conftest import gloo_group
from tests.distributed.conftest import START

STEPS = 25


def model() -> nn.Module:
    """A conv (several rows per example), Linear layers with and without bias, a LayerNorm (Adam's step)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(27, 8, bias=False), nn.LayerNorm(8), nn.Tanh(),
        nn.Linear(8, 3),
    ).double()  # fmt: skip


def factor_bytes(net: nn.Module) -> int:
    """Per step: every Kronecker layer's input diagonal (fan-in, + 1 with a bias), output diagonal and row count."""
    layers = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return 8 * sum(m.weight[0].numel() + (m.bias is not None) + m.weight.size(0) + 1 for m in layers)


def _worker(rank: int, world: int, init_file: str, results: str) -> None:
    torch.set_num_threads(1)  # two ranks on two cores
    with gloo_group(rank, world, init_file):
        gen = torch.Generator().manual_seed(1)
        batches = [(torch.randn(16, 2, 5, 5, generator=gen, dtype=torch.float64),
                    torch.randint(0, 3, (16,), generator=gen)) for _ in range(STEPS)]  # fmt: skip
        out = {}
        cases = {"averaged": {}, "group": {"process_group": dist.new_group(list(range(world)))},
                 "local": {"process_group": False}}  # fmt: skip
        for case, options in cases.items():
            net = model()
            ddp, opt = DDP(net), stochopt.AdaFisher(net, lr=0.01, weight_decay=0.01, **options)
            for x, y in batches:
                opt.zero_grad()
                F.cross_entropy(ddp(x[rank::world]), y[rank::world]).backward()
                opt.step()
            out[case] = [p.detach().clone() for p in net.parameters()]
            out[f"{case}_bytes"] = opt.factor_bytes_reduced
        ref = model()
        opt = stochopt.AdaFisher(ref, lr=0.01, weight_decay=0.01)
        for x, y in batches:  # one process, the whole batch in one pass
            opt.zero_grad()
            F.cross_entropy(ref(x), y).backward()
            opt.step()
        out["reference"] = [p.detach().clone() for p in ref.parameters()]
        out["start"] = [p.detach().clone() for p in model().parameters()]
        torch.save(out, f"{results}.{rank}")


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a, b))


def test_ddp_adafisher_equals_the_global_batch(tmp_path) -> None:
    results = str(tmp_path / "results.pt")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, start_method=START)
    out = [torch.load(f"{results}.{rank}") for rank in range(2)]
    for rank in range(2):
        assert _max_diff(out[rank]["averaged"], out[rank]["reference"]) < 1e-10, rank
        assert _max_diff(out[rank]["group"], out[rank]["reference"]) < 1e-10, rank  # a group passed explicitly
        assert _max_diff(out[rank]["averaged"], out[rank]["start"]) > 1e-2  # the models did move
        # (18 + 1) + 3 + 1 for the conv, 27 + 8 + 1 for Linear(27, 8, bias=False), (8 + 1) + 3 + 1 for the head:
        # 72 float64 numbers, 576 bytes a step
        assert out[rank]["averaged_bytes"] == STEPS * factor_bytes(model()) == STEPS * 576
        assert out[rank]["local_bytes"] == 0
    # without the reduction the two replicas step with different preconditioners (the same averaged gradient)
    assert _max_diff(out[0]["local"], out[1]["local"]) > 1e-6
    assert _max_diff(out[0]["local"], out[0]["reference"]) > 1e-6
