"""Lookahead against a reference loop written from the paper's equations, and its torch.optim contract:
mid-period resume, schedulers, add_param_group, closures, hooks, validation."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import stochopt
from stochopt.optim.lookahead import Lookahead
from tests.conftest import assert_same, clone_params, make_params, run, set_grads

# Lookahead never looks inside the inner update, so small tensors test it as well as the fused-size ones
SHAPES = [(30, 20), (7, 5), (11,), (3, 4, 2), (1,)]


def reference_lookahead(params, steps, k, alpha, inner_update) -> None:
    """Zhang et al. (2019), Algorithm 1, with the inner update written out by hand on float64 tensors."""
    states = [{} for _ in params]
    slow = [p.detach().clone() for p in params]
    with torch.no_grad():
        for t in range(1, steps + 1):
            set_grads(params, t - 1)
            for p, st in zip(params, states):
                inner_update(t, p, p.grad.clone(), st)
            if t % k == 0:
                for p, phi in zip(params, slow):
                    phi += alpha * (p - phi)
                    p.copy_(phi)


def sgd_momentum_ref(lr, mu, wd):
    def update(t, p, g, st):
        g = g + wd * p
        st["b"] = g.clone() if t == 1 else mu * st["b"] + g  # torch.optim.SGD: b_1 = g_1
        p -= lr * st["b"]

    return update


def adam_ref(lr, b1, b2, eps, wd):
    def update(t, p, g, st):
        g = g + wd * p
        st["m"] = b1 * st.get("m", torch.zeros_like(p)) + (1 - b1) * g
        st["v"] = b2 * st.get("v", torch.zeros_like(p)) + (1 - b2) * g * g
        p -= lr / (1 - b1**t) * st["m"] / (torch.sqrt(st["v"]) / (1 - b2**t) ** 0.5 + eps)

    return update


@pytest.mark.parametrize("k, alpha", [(5, 0.5), (3, 0.8)])
def test_sgd_momentum_matches_reference(k, alpha):
    params = make_params(SHAPES)
    ref = clone_params(params)
    opt = Lookahead(torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01), k=k, alpha=alpha)
    run(opt, params, 200)
    reference_lookahead(ref, 200, k, alpha, sgd_momentum_ref(0.05, 0.9, 0.01))
    assert_same(params, ref)


@pytest.mark.parametrize("path", [{}, {"foreach": True}], ids=["default", "foreach"])
def test_stochopt_adam_matches_reference(path):
    params = make_params(SHAPES)
    ref = clone_params(params)
    inner = stochopt.Adam(params, lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01, **path)
    run(Lookahead(inner, k=6, alpha=0.5), params, 200)
    reference_lookahead(ref, 200, 6, 0.5, adam_ref(0.01, 0.9, 0.99, 1e-8, 0.01))
    assert_same(params, ref)


def test_alpha_one_is_the_inner_optimizer():
    params = make_params()
    plain = clone_params(params)
    run(Lookahead(torch.optim.SGD(params, lr=0.05, momentum=0.9), k=3, alpha=1.0), params, 20)
    run(torch.optim.SGD(plain, lr=0.05, momentum=0.9), plain, 20)
    for a, b in zip(params, plain):
        assert torch.equal(a, b)


@pytest.mark.parametrize("inner", ["torch_sgd", "stochopt_adam"])
def test_resume_mid_period_is_bit_exact(inner):
    def build(params):
        if inner == "torch_sgd":
            return Lookahead(torch.optim.SGD(params, lr=0.05, momentum=0.9), k=5, alpha=0.5)
        return Lookahead(stochopt.Adam(params, lr=0.01), k=5, alpha=0.5)

    params = make_params(dtype=torch.float32)
    opt = build(params)
    run(opt, params, 7)
    saved = copy.deepcopy(opt.state_dict())
    # torch.optim's format (what torch.distributed.checkpoint and the trainers read): the slow weights in each
    # parameter's state, k, alpha and the step count in every param group
    assert {"state", "param_groups"} <= set(saved) and "optimizer" not in saved
    group = saved["param_groups"][0]
    assert (group["lookahead_step"], group["lookahead_k"], group["lookahead_alpha"]) == (7, 5, 0.5)
    assert sorted(i for i, s in saved["state"].items() if "lookahead_slow_weights" in s) == list(range(len(params)))

    resumed_params = clone_params(params)
    resumed = build(resumed_params)
    resumed.load_state_dict(saved)
    run(opt, params, 13, start=7)
    run(resumed, resumed_params, 13, start=7)
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)
    for a, b in zip(opt.state_dict()["state"].values(), resumed.state_dict()["state"].values()):
        assert torch.equal(a["lookahead_slow_weights"], b["lookahead_slow_weights"])


def test_a_state_dict_of_the_nested_format_still_loads():
    """Checkpoints written before the slow weights moved into the per-parameter state: ``{"optimizer": inner,
    "slow_weights": {index: tensor}, "step", "k", "alpha"}``."""
    params = make_params()
    opt = Lookahead(stochopt.Adam(params, lr=0.01), k=5, alpha=0.5)
    run(opt, params, 7)
    sd = opt.state_dict()
    inner = copy.deepcopy(opt.optimizer.state_dict())
    slow = {i: s["lookahead_slow_weights"].clone() for i, s in sd["state"].items()}
    nested = {"optimizer": inner, "slow_weights": slow, "step": 7, "k": 5, "alpha": 0.5}
    resumed_params = clone_params(params)
    resumed = Lookahead(stochopt.Adam(resumed_params, lr=0.01), k=2, alpha=0.1)
    resumed.load_state_dict(nested)
    assert (resumed.k, resumed.alpha) == (5, 0.5)
    run(opt, params, 8, start=7)
    run(resumed, resumed_params, 8, start=7)
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)


def test_shares_the_inner_optimizer_objects():
    params = make_params()
    inner = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    opt = Lookahead(inner)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups and opt.defaults is inner.defaults and opt.state is inner.state
    run(opt, params, 3)
    opt.load_state_dict(opt.state_dict())  # torch's load_state_dict replaces the inner list: still shared
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    opt.zero_grad()
    assert all(p.grad is None for p in params)


def test_scheduler_changes_the_inner_lr():
    params = make_params()
    plain = clone_params(params)
    opt = Lookahead(torch.optim.SGD(params, lr=0.1, momentum=0.9), k=1, alpha=1.0)
    ref = torch.optim.SGD(plain, lr=0.1, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "lr_scheduler.step() before optimizer.step()"
        run(opt, params, 10, scheduler=torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5))
    run(ref, plain, 10, scheduler=torch.optim.lr_scheduler.StepLR(ref, step_size=3, gamma=0.5))
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    for a, b in zip(params, plain):
        assert torch.equal(a, b)


def test_add_param_group_after_some_steps():
    a = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    ref_a, ref_b = a.detach().clone(), b.detach().clone()
    opt = Lookahead(torch.optim.SGD([a], lr=0.1), k=5, alpha=0.5)
    for t in range(12):
        if t == 3:
            opt.add_param_group({"params": [b], "lr": 0.2})
        set_grads([a, b], t)
        opt.step()

    # by hand: b joins at step 4 (1-based); its slow copy is taken then and it is synchronized at 5 and 10
    slow_a, slow_b = ref_a.clone(), None
    for t in range(1, 13):
        ga, gb = _grads([ref_a, ref_b], t - 1)
        ref_a -= 0.1 * ga
        if t >= 4:
            slow_b = ref_b.clone() if slow_b is None else slow_b
            ref_b -= 0.2 * gb
        if t % 5 == 0:
            slow_a += 0.5 * (ref_a - slow_a)
            ref_a.copy_(slow_a)
            slow_b += 0.5 * (ref_b - slow_b)
            ref_b.copy_(slow_b)
    assert_same([a, b], [ref_a, ref_b])
    assert sorted(i for i, s in opt.state_dict()["state"].items() if "lookahead_slow_weights" in s) == [0, 1]


def _grads(tensors, step):
    """set_grads' noisy quadratic, returned instead of stored."""
    holders = [t.clone().requires_grad_() for t in tensors]
    set_grads(holders, step)
    return [h.grad for h in holders]


def test_closure_passes_through():
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    opt = Lookahead(torch.optim.SGD([w], lr=0.1), k=2)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    before = w.detach().clone()
    loss = opt.step(closure)
    assert len(calls) == 1
    assert torch.equal(loss, (before**2).sum())
    assert torch.allclose(w, before - 0.1 * 2 * before)


def test_step_hooks_run_on_the_wrapper():
    params = make_params()
    opt = Lookahead(torch.optim.SGD(params, lr=0.1))
    seen = []
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append(o))
    run(opt, params, 2)
    assert seen == [opt, opt]


def test_skipped_steps_do_not_count():
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = Lookahead(stochopt.SGD([w], lr=0.1, nonfinite="skip"), k=2, alpha=0.5)
    for g in (1.0, float("inf"), 1.0):
        w.grad = torch.full_like(w, g)
        opt.step()
    assert opt.optimizer.skipped_steps == 1 and opt.state_dict()["param_groups"][0]["lookahead_step"] == 2
    # two real steps of -0.1, then phi = 1 + 0.5 * (0.8 - 1)
    assert torch.allclose(w, torch.full_like(w, 0.9))


def test_deepcopy_keeps_slow_weights_attached():
    params = make_params()
    opt = Lookahead(torch.optim.SGD(params, lr=0.05, momentum=0.9), k=5)
    run(opt, params, 3)
    twin = copy.deepcopy(opt)
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    run(opt, params, 7, start=3)
    run(twin, twin_params, 7, start=3)
    for a, b in zip(params, twin_params):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(k=0), ValueError, r"k must be an int >= 1, got 0"),
        (dict(k=2.0), TypeError, r"k must be an int >= 1, got float 2.0"),
        (dict(k=True), TypeError, r"k must be .*bool True"),
        (dict(alpha=-0.1), ValueError, r"alpha must be in \[0, 1\], got -0.1"),
        (dict(alpha=1.5), ValueError, r"alpha must be in \[0, 1\], got 1.5"),
        (dict(alpha="0.5"), TypeError, r"alpha must be a number"),
    ],
)
def test_rejects_bad_hyperparameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        Lookahead(torch.optim.SGD(make_params(), lr=0.1), **kwargs)


def test_rejects_what_is_not_an_optimizer():
    params = make_params()
    with pytest.raises(TypeError, match="got list"):
        Lookahead(params)
    with pytest.raises(TypeError, match=r"got the class SGD; pass SGD\(params, ...\)"):
        Lookahead(torch.optim.SGD)


def test_rejects_foreign_or_mismatched_state_dicts():
    params = make_params()
    opt = Lookahead(torch.optim.SGD(params, lr=0.1), k=2)
    run(opt, params, 1)
    with pytest.raises(ValueError, match=r"not saved by Lookahead: its param groups lack \['lookahead_step'"):
        opt.load_state_dict(opt.optimizer.state_dict())
    with pytest.raises(ValueError, match=r"not saved by Lookahead: it lacks \['slow_weights', 'step'"):
        opt.load_state_dict({"optimizer": opt.optimizer.state_dict()})
    bad = copy.deepcopy(opt.state_dict())
    bad["state"][1]["lookahead_slow_weights"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"slow weight 1 is \(2, 2\), parameter 1 has shape \(7, 5\)"):
        opt.load_state_dict(bad)
    bad["state"][99] = {"lookahead_slow_weights": torch.zeros(1)}
    del bad["state"][1]
    with pytest.raises(ValueError, match="slow weight 99 has no parameter"):
        opt.load_state_dict(bad)
