"""Every registered stochopt optimizer inside torch.distributed.optim.ZeroRedundancyOptimizer equals unsharded
training (float64), and a ZeRO checkpoint (consolidate, save, load) resumes bit-exactly, sharded or unsharded;
2 gloo processes."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import stochopt
from stochopt.distributed import load_checkpoint, save_checkpoint, zero_optimizer
from tests.conftest import clone_params, gloo_group, make_params, set_grads
from tests.distributed.conftest import START

# the registry's defaults, except where a larger step makes a wrong shard show
HYPERPARAMETERS = {
    "adam": dict(lr=0.01, weight_decay=0.01), "lion": dict(lr=0.01), "sgd": dict(lr=0.05, momentum=0.9),
    "prodigy": dict(fsdp_in_use=True),  # its step size d is a sum over every parameter: over the ranks under ZeRO
}  # fmt: skip
RESUMED = ["adam", "lamb", "ranger"]  # ranger: Lookahead's slow weights and its step counter resume too
STEPS, SPLIT = 8, 3
SHAPES = [(30, 20), (7, 5), (11,), (3, 4, 2), (1,)]  # small: ZeRO's partition, not the kernels, is under test


def _worker(rank: int, world: int, init_file: str, results: str, checkpoint_dir: str) -> None:
    torch.set_num_threads(1)  # two or more ranks on two cores
    with gloo_group(rank, world, init_file):
        out = {"diff": {}, "state_params": {}, "resume": {}}
        for name in stochopt.list_optimizers():
            hp = HYPERPARAMETERS.get(name, {})
            params = make_params(SHAPES)
            local = clone_params(params)
            zero = zero_optimizer(params, name, **hp)
            plain = stochopt.create_optimizer(name, local, **hp)
            for t in range(10):
                set_grads(params, t)
                set_grads(local, t)
                zero.step()
                plain.step()
            zero.consolidate_state_dict(to=0)
            if rank == 0:
                out["diff"][name] = max((p - q).abs().max().item() for p, q in zip(params, local))
                out["state_params"][name] = len(zero.state_dict()["state"])
        for name in RESUMED:
            out["resume"][name] = _resume(name, os.path.join(checkpoint_dir, f"{name}.pt"))
        if rank == 0:
            torch.save(out, results)


def _train(model: nn.ParameterList, opt, start: int, stop: int) -> None:
    for t in range(start, stop):
        set_grads(list(model), t)
        opt.step()


def _resume(name: str, path: str) -> dict[str, float]:
    straight = nn.ParameterList(make_params(SHAPES))
    _train(straight, zero_optimizer(straight.parameters(), name), 0, STEPS)

    first = nn.ParameterList(make_params(SHAPES))
    opt = zero_optimizer(first.parameters(), name)
    _train(first, opt, 0, SPLIT)
    save_checkpoint(path, first, opt, step=SPLIT, extra={"note": "split"})

    resumed = nn.ParameterList(make_params(SHAPES, seed=7))  # other values: the checkpoint must bring the model back
    opt = zero_optimizer(resumed.parameters(), name)
    step, extra = load_checkpoint(path, resumed, opt)
    _train(resumed, opt, step, STEPS)

    unsharded = nn.ParameterList(make_params(SHAPES, seed=7))  # the same checkpoint into a plain optimizer
    plain = stochopt.create_optimizer(name, unsharded.parameters())
    load_checkpoint(path, unsharded, plain)
    _train(unsharded, plain, step, STEPS)
    return {
        "step": step, "extra": extra["note"],
        "sharded": max((p - q).abs().max().item() for p, q in zip(straight, resumed)),
        "unsharded": max((p - q).abs().max().item() for p, q in zip(straight, unsharded)),
        "moved": max((p - q).abs().max().item() for p, q in zip(straight, make_params(SHAPES))),
    }  # fmt: skip


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.start_processes(_worker, args=(2, str(tmp / "init"), str(tmp / "results.pt"), str(tmp)), nprocs=2,
                       start_method=START)  # fmt: skip
    return torch.load(tmp / "results.pt")


@pytest.mark.parametrize("name", stochopt.list_optimizers())
def test_zero_sharded_equals_unsharded(out, name) -> None:
    assert out["diff"][name] < 1e-12, name
    assert out["state_params"][name] == len(make_params(SHAPES))


@pytest.mark.parametrize("name", RESUMED)
def test_zero_checkpoint_resumes(out, name) -> None:
    result = out["resume"][name]
    assert (result["step"], result["extra"]) == (SPLIT, "split")
    assert result["moved"] > 1e-3  # training changed the parameters, so equality below means something
    assert result["sharded"] == 0.0
    assert result["unsharded"] < 1e-12


def test_missing_checkpoint_is_named(tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing.pt", nn.Linear(2, 2), stochopt.SGD(nn.Linear(2, 2).parameters()))
