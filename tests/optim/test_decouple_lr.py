"""``decouple_lr=True``: weight decay not scaled by the learning rate (p <- (1 - wd) p; Loshchilov & Hutter's
form), against float64 loops written here from the equations, in every execution path, with the lr changing
every step; and ``WeightDecaySchedule``, the decay's own schedule."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch

import stochopt
from stochopt.training import WeightDecaySchedule, warmup_decay_factor
from tests.conftest import PATHS, clone_params, make_params, set_grads

STEPS = 100
WD = 1e-3  # per step, not scaled by the lr


def lr_at(t: int) -> float:
    return 1e-2 * (0.55 + 0.45 * math.cos(math.pi * t / STEPS))  # a schedule: the lr differs every step


def reference(kind: str, params, steps: int, decay_at) -> list[torch.Tensor]:
    """AdamW (betas 0.9, 0.99, eps 1e-8) or Lion (betas 0.9, 0.99) in float64, the decay p <- (1 - decay_at(t)) p."""
    ps = clone_params(params)
    m = [torch.zeros_like(p) for p in ps]
    v = [torch.zeros_like(p) for p in ps]
    b1, b2 = 0.9, 0.99
    for t in range(steps):
        set_grads(ps, t)
        lr, k = lr_at(t), t + 1
        with torch.no_grad():
            for i, p in enumerate(ps):
                g = p.grad
                p.mul_(1 - decay_at(t))
                if kind == "adamw":
                    m[i] = b1 * m[i] + (1 - b1) * g
                    v[i] = b2 * v[i] + (1 - b2) * g * g
                    p.sub_(lr / (1 - b1**k) * m[i] / (v[i].sqrt() / math.sqrt(1 - b2**k) + 1e-8))
                else:
                    p.sub_(lr * torch.sign(b1 * m[i] + (1 - b1) * g))
                    m[i] = b2 * m[i] + (1 - b2) * g
    return ps


def train(opt, params, steps: int, schedule=None, start: int = 0) -> None:
    for t in range(start, start + steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(t)
        set_grads(params, t)
        opt.step()
        if schedule is not None:
            schedule.step()


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("kind", ["adamw", "lion"])
def test_decay_not_scaled_by_the_lr_equals_the_loop(kind, path):
    params = make_params()
    cls = stochopt.AdamW if kind == "adamw" else stochopt.Lion
    opt = cls(params, lr=lr_at(0), betas=(0.9, 0.99), weight_decay=WD, decouple_lr=True, **PATHS[path])
    train(opt, params, STEPS)
    for p, q in zip(params, reference(kind, make_params(), STEPS, lambda t: WD)):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    coupled = reference(kind, make_params(), STEPS, lambda t: lr_at(t) * WD)  # what torch's form does
    assert max((p - q).abs().max().item() for p, q in zip(params, coupled)) > 1e-4


def adamw(params, path: str) -> stochopt.AdamW:
    return stochopt.AdamW(params, lr=lr_at(0), betas=(0.9, 0.99), weight_decay=WD, decouple_lr=True, **PATHS[path])


@pytest.mark.parametrize("path", ["loop", "fused"])
def test_a_weight_decay_schedule_sets_the_decay_of_each_step_and_resumes(path):
    factor = functools.partial(warmup_decay_factor, warmup_steps=10, total_steps=STEPS)
    params = make_params()
    opt = adamw(params, path)
    schedule = WeightDecaySchedule(opt, factor)
    train(opt, params, STEPS // 2, schedule)
    saved = copy.deepcopy(opt.state_dict()), schedule.state_dict()  # state_dict holds the live tensors
    train(opt, params, STEPS // 2, schedule, start=STEPS // 2)
    for p, q in zip(params, reference("adamw", make_params(), STEPS, lambda t: WD * factor(t))):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)

    resumed = make_params()  # the weights of step 50 come from the run above: only the state is loaded here
    with torch.no_grad():
        for p, q in zip(resumed, reference("adamw", make_params(), STEPS // 2, lambda t: WD * factor(t))):
            p.copy_(q)
    again = adamw(resumed, path)
    again_schedule = WeightDecaySchedule(again, factor)
    again.load_state_dict(saved[0])
    again_schedule.load_state_dict(saved[1])
    assert [g["weight_decay"] for g in again.param_groups] == [WD * factor(STEPS // 2)]
    train(again, resumed, STEPS // 2, again_schedule, start=STEPS // 2)
    for p, q in zip(resumed, params):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def sgdw_reference(params, steps: int, wd: float, decouple_lr: bool) -> list[torch.Tensor]:
    """SGDW (Loshchilov & Hutter, 2019, Algorithm 1) with Nesterov momentum 0.9, in float64."""
    ps = clone_params(params)
    bufs = [None] * len(ps)
    for t in range(steps):
        set_grads(ps, t)
        lr = lr_at(t)
        with torch.no_grad():
            for i, p in enumerate(ps):
                g = p.grad
                bufs[i] = g.clone() if bufs[i] is None else 0.9 * bufs[i] + g
                p.mul_(1 - (wd if decouple_lr else lr * wd))
                p.sub_(lr * (g + 0.9 * bufs[i]))
    return ps


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("decouple_lr", [False, True])
def test_sgdw_equals_the_loop(path, decouple_lr):
    """SGD with decoupled_weight_decay=True (torch's native fused SGD has L2 decay only: the factor is applied
    before it); with decouple_lr the factor is 1 - wd."""
    params = make_params()
    wd = WD if decouple_lr else 0.1
    opt = stochopt.SGD(
        params, lr=lr_at(0), momentum=0.9, nesterov=True, weight_decay=wd, decoupled_weight_decay=True,
        decouple_lr=decouple_lr, **PATHS[path],
    )  # fmt: skip
    train(opt, params, STEPS)
    for p, q in zip(params, sgdw_reference(make_params(), STEPS, wd, decouple_lr)):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_prodigy_decay_without_d_and_lr():
    """Prodigy's decoupled decay is p - wd d lr p (the authors' form); with decouple_lr it is p - wd p. On the
    first step the rest of the update does not see the weights (d's estimate starts from p - p0 = 0), so the
    runs with and without decay differ by the decay alone: -wd p0, and -wd d0 lr p0 in the authors' form."""
    for decouple_lr, shift in ((True, -0.01), (False, -0.01 * 1e-6 * 1.0)):
        runs = []
        for wd in (0.01, 0.0):
            p = torch.ones(4, 4, dtype=torch.float64, requires_grad=True)
            opt = stochopt.Prodigy([p], lr=1.0, weight_decay=wd, decouple_lr=decouple_lr)
            p.grad = torch.full_like(p, 0.5)
            opt.step()
            runs.append(p.detach())
        torch.testing.assert_close(runs[0] - runs[1], torch.full_like(runs[0], shift), rtol=1e-9, atol=1e-15)


def test_muon_decay_is_wd_alone():
    """Muon's matrices (Newton-Schulz, the engine's whole-matrix path): decouple_lr with wd equals torch's form
    with wd / lr at a constant lr."""
    runs = []
    for options in ({"weight_decay": 0.02, "decouple_lr": True}, {"weight_decay": 0.02 / 0.05}):
        params = make_params([(16, 8), (8,)])
        groups = [{"params": params[:1], "use_muon": True}, {"params": params[1:], "use_muon": False}]
        opt = stochopt.Muon(groups, lr=0.05, adamw_lr=0.05, **options)
        for t in range(STEPS):
            set_grads(params, t)
            opt.step()
        runs.append(params)
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9)


def test_decouple_lr_is_refused_where_the_decay_is_not_decoupled():
    params = [torch.zeros(3, 3, requires_grad=True)]
    with pytest.raises(ValueError, match="decouple_lr=True.*SGD's weight decay"):
        stochopt.SGD([{"params": params, "decouple_lr": True}], lr=0.1, weight_decay=0.1)
    with pytest.raises(ValueError, match="decouple_lr=True.*Adam's weight decay"):
        stochopt.Adam(params, weight_decay=0.1, decouple_lr=True)
    with pytest.raises(ValueError, match="decouple_lr=True.*Adagrad's weight decay"):
        stochopt.Adagrad([{"params": params, "decouple_lr": True}], weight_decay=0.1)
    stochopt.Adam(params, weight_decay=0.1, decouple_lr=True, decoupled_weight_decay=True)  # decoupled: accepted
    with pytest.raises(TypeError, match="decouple_lr"):
        stochopt.AdamW(params, decouple_lr="yes")
    with pytest.raises(ValueError, match=r"factor\(0\) must be a finite number"):
        WeightDecaySchedule(stochopt.AdamW(params), lambda t: -1.0)
