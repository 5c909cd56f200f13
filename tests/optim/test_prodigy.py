"""Prodigy against the authors' package (prodigyopt 1.1.2): 200 float64 steps on iterate-dependent gradients, in
every path Prodigy runs (loop, foreach, default; the fused kernel on one configuration that combines the options),
with the options that change the math spread over configurations and param groups; the group entries of the d
estimate, the state, resume, the documented differences, the refusals, and fsdp_in_use over two processes."""

from __future__ import annotations

import io
import math
import os

import pytest
import torch
import torch.multiprocessing as mp

import stochopt
from stochopt.engine import optimizer as engine
from tests.conftest import PATHS, assert_same, clone_params, gloo_group, make_params, run, set_grads

prodigyopt = pytest.importorskip("prodigyopt")

# small tensors (large ones run OpenMP regions, which other processes on the cores slow down many times), one of a
# single element (the fused path runs it uncompiled); the default path's runs lower its size threshold below the
# first, so that it loops over that one and takes the others in one multi-tensor call, as it does on a model
SHAPES = [(40, 32), (7, 5), (11,), (3, 4, 2), (1,)]
STEPS = 200
GROUP_ENTRIES = ("d", "d_max", "d_numerator", "d_denom", "d_hat", "k")

# (options of the one d estimate, per-group options by param indices): each configuration exercises several
# options at once, and the per-group ones differ between its groups
CONFIGS = {
    # decoupled weight decay, bias correction, safeguard_warmup, beta3, d0, d_coef and a finite growth_rate;
    # per group: weight decay, eps, safeguard_warmup, slice_p (the groups share their flags: one fused kernel)
    "combined": (
        dict(betas=(0.9, 0.99), beta3=0.98, use_bias_correction=True, decouple=True, d0=1e-4, d_coef=0.8,
             growth_rate=1.05),
        [([0, 3], dict(weight_decay=0.1, safeguard_warmup=True)),
         ([1, 2, 4], dict(weight_decay=0.02, eps=1e-6, slice_p=3))],
    ),
    # coupled (L2) weight decay of two strengths, beta1 = 0 (the step along d g), d_coef > 1, unlimited growth
    "coupled": (
        dict(betas=(0.0, 0.999), decouple=False, d_coef=2.0),
        [([0, 1], dict(weight_decay=0.05)), ([2, 3, 4], dict(weight_decay=0.2, safeguard_warmup=True))],
    ),
    # the defaults, a group without weight decay, a group frozen with lr = 0 from the start, lr scheduled (cosine)
    "scheduled": (
        dict(weight_decay=0.01),
        [([0, 1], {}), ([2], dict(weight_decay=0.0)), ([3, 4], dict(lr=0.0, weight_decay=0.0))],
    ),
}  # fmt: skip
CASES = [(config, path) for config in CONFIGS for path in ("loop", "foreach", "default")] + [("combined", "fused")]


def groups(params: list[torch.Tensor], config: str) -> list[dict]:
    return [{"params": [params[i] for i in indices], **options} for indices, options in CONFIGS[config][1]]


def schedule(opt: torch.optim.Optimizer, config: str):
    if config != "scheduled":
        return None
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / STEPS)))


def zip_params(opt, ref):
    for group, ref_group in zip(opt.param_groups, ref.param_groups):
        for p, q in zip(group["params"], ref_group["params"]):
            yield group, p, q


def assert_like_prodigyopt(opt, ref, params, ref_params, exact: bool) -> None:
    tolerance = {"rtol": 0, "atol": 0} if exact else {}
    assert_same(params, ref_params, **tolerance)
    for group, ref_group in zip(opt.param_groups, ref.param_groups):
        for key in GROUP_ENTRIES:
            assert math.isclose(group[key], ref_group[key], rel_tol=0 if exact else 1e-12), key
    for group, p, q in zip_params(opt, ref):
        ours, theirs = opt.state[p], ref.state[q]
        if group["lr"] > 0:  # the package counts the steps of a frozen group too
            assert int(ours["step"]) == theirs["step"]
        for key in ("s", "p0", "exp_avg", "exp_avg_sq"):
            if key in theirs or key in ours:
                expected = theirs[key].expand_as(ours[key])
                # s is an EMA of terms of both signs: its error is relative to its terms, not to each entry
                scale = {} if exact else {"atol": 1e-12 * expected.abs().max().item()}
                assert_same([ours[key]], [expected], **{**tolerance, **scale})


@pytest.mark.parametrize("config, path", CASES, ids=[f"{c}-{p}" for c, p in CASES])
def test_equals_prodigyopt(config: str, path: str, monkeypatch) -> None:
    monkeypatch.setattr(engine, "SMALL_TENSOR_NUMEL", 1000)
    params = make_params(SHAPES)
    ref_params = clone_params(params)
    shared = CONFIGS[config][0]
    opt = stochopt.Prodigy(groups(params, config), **shared, **PATHS[path])
    ref = prodigyopt.Prodigy(groups(ref_params, config), **shared)
    run(opt, params, STEPS, scheduler=schedule(opt, config))
    run(ref, ref_params, STEPS, scheduler=schedule(ref, config))
    # bit for bit in the eager paths; the compiled kernel orders its arithmetic its own way
    assert_like_prodigyopt(opt, ref, params, ref_params, exact=path != "fused")
    assert opt.param_groups[0]["d"] > 100 * shared.get("d0", 1e-6)  # the estimate has grown
    if config == "scheduled":  # the frozen group has not moved
        assert all(torch.equal(p, q) for p, q in zip(params[3:], make_params(SHAPES)[3:]))


def test_resume_with_several_groups_is_bit_exact() -> None:
    shared = CONFIGS["combined"][0]
    params = make_params(SHAPES)
    opt = stochopt.Prodigy(groups(params, "combined"), **shared)
    run(opt, params, 10)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    resumed_params = clone_params(params)
    resumed = stochopt.Prodigy(groups(resumed_params, "combined"), **shared)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    assert all(resumed.param_groups[i][k] == opt.param_groups[i][k] for i in range(2) for k in GROUP_ENTRIES)
    run(opt, params, 10, start=10)
    run(resumed, resumed_params, 10, start=10)
    assert_same(params, resumed_params, rtol=0, atol=0)
    assert resumed.param_groups[0]["d"] == opt.param_groups[0]["d"]


def test_zero_gradients_leave_d_and_the_parameters_as_prodigyopt_does() -> None:
    """No gradient has reached the estimate (its denominator is 0): the package returns before its parameter loop;
    so does Prodigy, and the run then continues alike."""
    params = make_params(SHAPES[1:])
    ref_params = clone_params(params)
    opt, ref = stochopt.Prodigy(params, weight_decay=0.1), prodigyopt.Prodigy(ref_params, weight_decay=0.1)
    before = clone_params(params)
    for model, ps in ((opt, params), (ref, ref_params)):
        for _ in range(3):
            for p in ps:
                p.grad = torch.zeros_like(p)
            model.step()
    assert_same(params, before, rtol=0, atol=0)
    assert opt.param_groups[0]["d"] == 1e-6 and opt.param_groups[0]["k"] == 0 == ref.param_groups[0]["k"]
    run(opt, params, 20, start=3)
    run(ref, ref_params, 20, start=3)
    assert_same(params, ref_params)


def test_documented_differences_from_prodigyopt() -> None:
    """A group with lr = 0 does not move, where the package still decays it; p.grad is left as it was, where the
    package adds the L2 term to it."""
    params = make_params(SHAPES[1:])
    ref_params = clone_params(params)
    frozen = {"lr": 0.0, "weight_decay": 0.5}
    opt = stochopt.Prodigy([{"params": params[:2]}, {"params": params[2:], **frozen}])
    ref = prodigyopt.Prodigy([{"params": ref_params[:2]}, {"params": ref_params[2:], **frozen}])
    run(opt, params, 10)
    run(ref, ref_params, 10)
    start = make_params(SHAPES[1:])
    assert all(torch.equal(p, q) for p, q in zip(params[2:], start[2:]))
    assert not any(torch.equal(p, q) for p, q in zip(ref_params[2:], start[2:]))  # the package decays them
    assert_same(params[:2], ref_params[:2], rtol=0, atol=0)  # the others alike
    coupled = make_params(SHAPES[1:])
    opt = stochopt.Prodigy(coupled, weight_decay=0.5, decouple=False)
    set_grads(coupled, 0)
    grads = [p.grad.clone() for p in coupled]
    opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(coupled, grads))


def test_bad_values_are_rejected_by_name() -> None:
    params = make_params(SHAPES[1:])
    for kwargs, error, pattern in [
        (dict(growth_rate=0.5), ValueError, r"growth_rate must be a number >= 1, got 0.5"),
        (dict(slice_p=0), ValueError, r"slice_p must be an int >= 1, got 0"),
        (dict(slice_p=2.0), TypeError, r"slice_p must be an int"),
        (dict(beta3=1.5), ValueError, r"beta3 must be in \[0, 1\], got 1.5"),
        (dict(d0=0.0), ValueError, r"d0 must be a finite number > 0"),
        (dict(d_coef=-1.0), ValueError, r"d_coef must be a finite number > 0"),
        (dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\] must be in \[0, 1\)"),
        (dict(decouple="yes"), TypeError, r"decouple must be True or False"),
        (dict(safeguard_warmup=1), TypeError, r"safeguard_warmup must be True or False"),
        (dict(capturable=True), ValueError, r"Prodigy does not support capturable=True"),
    ]:
        with pytest.raises(error, match=pattern):
            stochopt.Prodigy(params, **kwargs)
    # the options of the one estimate must agree between groups; lr is the others' or 0
    with pytest.raises(ValueError, match=r"d_coef must be the same in every param group.*d_coef=2.0"):
        stochopt.Prodigy([{"params": params[:2]}, {"params": params[2:], "d_coef": 2.0}])
    opt = stochopt.Prodigy([{"params": params[:2]}, {"params": params[2:]}])
    set_grads(params, 0)
    opt.param_groups[1]["lr"] = 0.5
    with pytest.raises(ValueError, match=r"lr must be the same in every param group, or 0.*lr=0.5 beside lr=1.0"):
        opt.step()
    opt.param_groups[1]["lr"] = 1.0
    opt.param_groups[1]["betas"] = (0.8, 0.999)
    with pytest.raises(ValueError, match=r"betas must be the same in every param group"):
        opt.step()


def _sharded_worker(rank: int, world: int, init_file: str, results: str) -> None:
    """Each process holds every other tensor, as FSDP or ZeRO shard the parameters: the estimate's sums are reduced
    over the processes, the updates stay local; the reference is one process holding all of them. Then one process
    holds them all and the other none (a ZeRO rank that owns no parameter), which joins the reduction."""
    with gloo_group(rank, world, init_file):
        params, empty = make_params(SHAPES[1:]), make_params(SHAPES[1:])
        mine = [i for i in range(len(params)) if i % world == rank]
        opt = stochopt.Prodigy([params[i] for i in mine], weight_decay=0.1, fsdp_in_use=True)
        lopsided = stochopt.Prodigy(empty if rank == 0 else [{"params": []}], weight_decay=0.1, fsdp_in_use=True)
        alone = clone_params(params)
        ref = stochopt.Prodigy(alone, weight_decay=0.1)
        for t in range(30):
            for ps in (params, empty, alone):
                set_grads(ps, t)
            opt.step()
            lopsided.step()
            ref.step()
        error = max(((params[i] - alone[i]).abs().max() / alone[i].abs().max()).item() for i in mine)
        if rank == 0:
            error = max(error, max(((p - q).abs().max() / q.abs().max()).item() for p, q in zip(empty, alone)))
        d = [o.param_groups[0]["d"] for o in (opt, lopsided, ref)]
        torch.save({"error": error, "d": d}, f"{results}.{rank}")


def test_fsdp_in_use_reduces_the_estimate_over_processes(tmp_path) -> None:
    results = str(tmp_path / "results.pt")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_sharded_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    for rank in range(2):
        out = torch.load(f"{results}.{rank}")
        assert out["error"] < 1e-12, out
        d, d_lopsided, d_alone = out["d"]
        assert math.isclose(d, d_alone, rel_tol=1e-12) and d_lopsided == d_alone and d > 1e-4, out
