"""Shared fixtures: a deterministic problem whose gradients depend on the parameters."""

from __future__ import annotations

import contextlib
import functools
import os

import pytest
import torch
import torch._inductor.config
import torch.distributed as dist

import stochopt.engine.fused as _fused  # noqa: E402

#: The compiled kernel takes BUCKET_WIDTH tensors per launch (4 shipped). The suite compiles some hundred kernel
#: variants on a cold inductor cache; at a width of 1 each compiles faster (measured: the fused cases of
#: tests/optim/test_against_torch.py, cold cache, -n 2: 115 s at 2, 95 s at 1). An update function sees one tensor
#: at a time whatever the width (fused.update_bucket calls it per tensor), so the width changes only the engine's
#: batching (several tensors per launch, padding, one coefficient row each), which tests/engine/test_compile.py
#: checks at the shipped width.
SHIPPED_BUCKET_WIDTH = _fused.DEFAULT_BUCKET_WIDTH  # not BUCKET_WIDTH: pytest may import this file twice
_fused.BUCKET_WIDTH = 1

#: inductor's C++ kernels without SIMD: the vectorized prelude costs each cold process ~25 s and each kernel ~30 %
#: more to compile (measured: AdamW's first fused step on an empty cache 29.0 s against 5.6 s, NAdam's 3.1 s against
#: 1.5 s). The update code inductor is given is the same; how inductor lowers it to vector instructions is its own,
#: and tests/engine/test_compile.py::test_the_shipped_vectorized_kernels_equal_the_loop runs that in a process of
#: its own. Set here, before anything compiles (inductor reads it once), also in the processes that import this file.
torch._inductor.config.cpp.vec_isa_ok = False

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per test worker: two workers with two OpenMP threads each on two cores spin against each other;
    # and inductor compiles in the worker itself: a pool of compile processes per worker only adds processes
    torch.set_num_threads(1)
    torch._inductor.config.compile_threads = 1

# one tensor above the CPU default's size threshold (it then loops over the large ones), small ones below it, and
# one of a single element (the compiled path runs it uncompiled: dynamo specializes sizes 0 and 1)
SHAPES = [(300, 256), (7, 5), (11,), (3, 4, 2), (1,)]
# "fused" is stochopt's compiled kernel (torch's own fused kernels, which fused=True picks on the CPU for Adam,
# AdamW, SGD and Adagrad, are switched off by the fixture and tested apart); "capturable" is the compiled kernel
# in tensor mode (step counters on the device, coefficients computed there)
PATHS = {
    "loop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
    "capturable": {"capturable": True},
    "default": {},
}


def make_params(shapes=SHAPES, dtype=torch.float64, seed=0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def clone_params(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


@functools.lru_cache(maxsize=512)  # at most ~0.6 GB of noise per worker
def _noise(step: int, shapes: tuple[torch.Size, ...]) -> tuple[torch.Tensor, ...]:
    """The noise of step ``step``, drawn once per worker: drawing it (float64 normals) was most of an eager
    test's time, and the optimizer and its reference draw the same values for every step."""
    gen = torch.Generator().manual_seed(1000 + step)
    return tuple(torch.randn(shape, generator=gen, dtype=torch.float64) for shape in shapes)


def set_grads(params: list[torch.Tensor], step: int) -> None:
    """g = p * scale + noise_t: a noisy quadratic, so a wrong step changes every later gradient."""
    for i, (p, noise) in enumerate(zip(params, _noise(step, tuple(p.shape for p in params)))):
        p.grad = (p.detach().double() * (0.5 + 0.1 * i) + noise).to(p.dtype)


def run(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: int, start: int = 0, scheduler=None) -> None:
    for t in range(start, start + steps):
        set_grads(params, t)
        opt.step()
        if scheduler is not None:
            scheduler.step()


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor], rtol: float = 1e-12, atol: float = 1e-12) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=rtol, atol=atol)


#: the paths of optimizers whose step decides on the host (Shampoo, Muon, AdaFisher refuse capturable=True by
#: name: tests/test_contract.py test_execution_paths_agree)
HOST_PATHS = [name for name in PATHS if name != "capturable"]


def _select_path(name: str, monkeypatch) -> dict:
    if name in ("fused", "capturable"):
        from stochopt.engine import EngineOptimizer

        monkeypatch.setattr(EngineOptimizer, "use_native_fused", False)
    return PATHS[name]


@pytest.fixture(params=list(PATHS), ids=list(PATHS))
def path(request, monkeypatch) -> dict:
    return _select_path(request.param, monkeypatch)


@pytest.fixture(params=HOST_PATHS, ids=HOST_PATHS)
def host_path(request, monkeypatch) -> dict:
    return _select_path(request.param, monkeypatch)


@contextlib.contextmanager
def gloo_group(rank: int, world: int, init_file: str):
    """One rank's gloo process group for a spawned test worker. The closing barrier matters: a rank that tears its
    group down while another still works on it can abort with "terminate called without an active exception"
    (gloo's threads: tests/training/test_accumulation.py's DDP test did, in CI and here). After an error there is
    no barrier: the other ranks may never reach it, and mp.spawn stops them."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
