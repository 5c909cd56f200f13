"""stochopt optimizers inside torch.distributed.optim.ZeroRedundancyOptimizer, 2 gloo processes."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.optim import ZeroRedundancyOptimizer

import stochopt
from tests.conftest import clone_params, make_params, set_grads

CLASSES = {"Adam": dict(lr=0.01, weight_decay=0.01), "Lion": dict(lr=0.01), "SGD": dict(lr=0.05, momentum=0.9)}


def _worker(rank: int, world: int, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = {}
        for name, hp in CLASSES.items():
            params = make_params()
            local = clone_params(params)
            zero = ZeroRedundancyOptimizer(params, optimizer_class=getattr(stochopt, name), **hp)
            plain = getattr(stochopt, name)(local, **hp)
            for t in range(10):
                set_grads(params, t)
                set_grads(local, t)
                zero.step()
                plain.step()
            zero.consolidate_state_dict(to=0)
            if rank == 0:
                full = zero.state_dict()
                out[name] = {
                    "max_diff": max((p - q).abs().max().item() for p, q in zip(params, local)),
                    "state_params": len(full["state"]),
                }
        if rank == 0:
            torch.save(out, results)
    finally:
        dist.destroy_process_group()


def test_zero_sharded_equals_unsharded(tmp_path) -> None:
    results = str(tmp_path / "results.pt")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    out = torch.load(results)
    for name in CLASSES:
        assert out[name]["max_diff"] < 1e-12, name
        assert out[name]["state_params"] == len(make_params())
