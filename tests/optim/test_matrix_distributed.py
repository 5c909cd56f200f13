"""Matrix optimizers on torch.distributed, 2 gloo processes: Muon's distributed form (round-robin ownership,
all-gather; every momentum on every rank, so that rank 0's checkpoint resumes in one process) equals
single-process Muon; Muon, Shampoo and SOAP under DDP equal full-batch single-process training."""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import stochopt
from tests.conftest import clone_params, gloo_group, make_params, set_grads

# five matrices of one shape (ownership wraps around the two ranks unevenly), one of another, a conv, vectors
SHAPES = [(12, 8)] * 5 + [(6, 10), (4, 3, 2, 2), (7,), (1,)]


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).double()


OPTIMIZERS = {
    # float64 Newton-Schulz: DDP's averaged gradient differs from the full batch's in the last bits, which a
    # bfloat16 iteration would turn into differences of its own rounding
    "muon": lambda m: stochopt.Muon(stochopt.muon_param_groups(m, adamw_lr=1e-2), lr=0.02, ns_dtype=torch.float64),
    "shampoo": lambda m: stochopt.Shampoo(m.parameters(), lr=0.05, precondition_frequency=2,
                                          max_preconditioner_dim=8),
    "soap": lambda m: stochopt.SOAP(m.parameters(), lr=0.01, precondition_frequency=2),
}  # fmt: skip


def _worker(rank: int, world: int, init_file: str, results: str) -> None:
    with gloo_group(rank, world, init_file):
        out = {}
        # distributed Muon: same gradients everywhere, each rank orthogonalizes its share, all-gather
        params = make_params(SHAPES)
        local = clone_params(params)
        shared = stochopt.Muon(params, lr=0.02, weight_decay=0.01, distributed=True)
        alone = stochopt.Muon(local, lr=0.02, weight_decay=0.01)
        for t in range(10):
            set_grads(params, t)
            set_grads(local, t)
            shared.step()
            alone.step()
        out["distributed_muon"] = max((p - q).abs().max().item() for p, q in zip(params, local))
        # every rank keeps every matrix's momentum (not only its owner): rank 0's checkpoint resumes in one process
        out["momenta"] = max(
            (shared.state[p]["momentum_buffer"] - alone.state[q]["momentum_buffer"]).abs().max().item()
            for p, q in zip(params[:7], local[:7])
        )
        resumed_params = clone_params(params)
        resumed = stochopt.Muon(resumed_params, lr=0.02, weight_decay=0.01)
        resumed.load_state_dict(shared.state_dict())
        for t in range(10, 15):
            set_grads(resumed_params, t)
            set_grads(local, t)
            resumed.step()
            alone.step()
        out["resumed"] = max((p - q).abs().max().item() for p, q in zip(resumed_params, local))
        # DDP: each rank half of the batch; the reference trains on the whole batch in one process
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(16, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen)
        for name, make in OPTIMIZERS.items():
            net, ref = model(), model()
            ddp = DDP(net)
            opt, ref_opt = make(net), make(ref)
            for _ in range(8):
                opt.zero_grad()
                F.cross_entropy(ddp(x[rank::world]), y[rank::world]).backward()
                opt.step()
                ref_opt.zero_grad()
                # the mean over the two halves, as DDP averages the halves' mean gradients
                sum(F.cross_entropy(ref(x[r::world]), y[r::world]) for r in range(world)).div(world).backward()
                ref_opt.step()
            out[name] = max((p - q).abs().max().item() for p, q in zip(net.parameters(), ref.parameters()))
            start = model().parameters()
            out[f"{name}_moved"] = max((p - q).abs().max().item() for p, q in zip(net.parameters(), start))
        torch.save(out, f"{results}.{rank}")


def test_distributed_muon_and_ddp(tmp_path) -> None:
    results = str(tmp_path / "results.pt")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    for rank in range(2):
        out = torch.load(f"{results}.{rank}")
        assert out["distributed_muon"] < 1e-12
        assert out["momenta"] == 0.0
        assert out["resumed"] < 1e-12
        for name in OPTIMIZERS:
            assert out[name] < 1e-10, (name, out[name])
            assert out[f"{name}_moved"] > 1e-3  # the comparison is not between two untouched models
