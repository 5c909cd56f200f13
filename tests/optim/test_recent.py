"""AdEMAMix, ADOPT, MARS and cautious updates against independent references: the ADOPT authors' package
(torch-adopt) and loops written here from the papers' equations; float64, 150 steps on the iterate-dependent
gradients of tests/conftest.py, every execution path."""

from __future__ import annotations

import math

import pytest
import torch

import stochopt
from tests.conftest import assert_same, make_params, run
from tests.optim.test_references import reference_run

STEPS = 150


def ademamix_ref(lr, b1, b2, b3, alpha, t_alpha, t_beta3, eps, wd):
    """Algorithm 1 of Pagliardini et al. (2024), with its schedulers written from the paper's formulas."""

    def beta3_at(t):
        if t_beta3 is None or t >= t_beta3:
            return b3
        # linear in the half-life: f(beta) = ln 0.5 / ln beta - 1, f^-1(h) = 0.5^(1/(h+1))
        f = lambda beta: math.log(0.5) / math.log(beta + 1e-8) - 1  # noqa: E731
        h = (1 - t / t_beta3) * f(b1) + t / t_beta3 * f(b3)
        return 0.5 ** (1 / (h + 1))

    def update(t, p, g, st):
        a = alpha if t_alpha is None else alpha * min(t / t_alpha, 1.0)
        beta3 = beta3_at(t)
        st["m1"] = b1 * st.get("m1", torch.zeros_like(p)) + (1 - b1) * g
        st["m2"] = beta3 * st.get("m2", torch.zeros_like(p)) + (1 - beta3) * g
        st["v"] = b2 * st.get("v", torch.zeros_like(p)) + (1 - b2) * g * g
        m1_hat = st["m1"] / (1 - b1**t) if b1 > 0 else g
        u = (m1_hat + a * st["m2"]) / (torch.sqrt(st["v"] / (1 - b2**t)) + eps)
        p -= lr * (u + wd * p)

    return update


def mars_ref(lr, b1, b2, eps, wd, gamma, lr_1d, b1d, wd_1d, optimize_1d):
    """MARS-AdamW (Yuan et al., 2024), the approximate form: c_t from the previous gradient, clipped to norm 1;
    AdamW for 1-D tensors unless optimize_1d."""

    def update(t, p, g, st):
        if p.dim() >= 2 or optimize_1d:
            c = g + gamma * b1 / (1 - b1) * (g - st.get("g_prev", torch.zeros_like(p)))
            st["g_prev"] = g.clone()
            c = c / max(1.0, float(c.norm()))
            beta1, beta2, rate, decay = b1, b2, lr, wd
        else:
            c, (beta1, beta2), rate, decay = g, b1d, lr_1d, wd_1d
        st["m"] = beta1 * st.get("m", torch.zeros_like(p)) + (1 - beta1) * c
        st["v"] = beta2 * st.get("v", torch.zeros_like(p)) + (1 - beta2) * c * c
        u = st["m"] / (1 - beta1**t) / (torch.sqrt(st["v"] / (1 - beta2**t)) + eps)
        p -= rate * (u + decay * p)

    return update


def cautious_mask(u, g):
    """Liang et al. (2024): keep u where it agrees in sign with g, rescaled by d / (kept + 1)."""
    kept = (u * g > 0).double()
    return u * kept * (kept.numel() / (kept.sum() + 1))


def cautious_ref(name, lr, b1, b2, eps, wd, momentum):
    def update(t, p, g, st):
        if name == "adamw":
            p *= 1 - lr * wd
            st["m"] = b1 * st.get("m", torch.zeros_like(p)) + (1 - b1) * g
            st["v"] = b2 * st.get("v", torch.zeros_like(p)) + (1 - b2) * g * g
            u = cautious_mask(st["m"], g) / (1 - b1**t)
            p -= lr * u / (torch.sqrt(st["v"] / (1 - b2**t)) + eps)
        elif name == "lion":
            p *= 1 - lr * wd
            m = st.get("m", torch.zeros_like(p))
            p -= lr * cautious_mask(torch.sign(b1 * m + (1 - b1) * g), g)
            st["m"] = b2 * m + (1 - b2) * g
        else:  # heavy-ball SGD, torch's form (b_1 = g_1), L2 decay in the gradient
            g = g + wd * p
            st["b"] = momentum * st["b"] + g if "b" in st else g.clone()
            p -= lr * cautious_mask(st["b"], g)

    return update


def _compare(name: str, hp: dict, reference, path: dict, rtol: float = 1e-11) -> None:
    params, expected = make_params(), make_params()
    run(stochopt.create_optimizer(name, params, **hp, **path), params, STEPS)
    reference_run(expected, STEPS, reference)
    assert_same(params, expected, rtol=rtol, atol=1e-12)


def test_ademamix_is_algorithm_1_with_its_schedulers(path: dict) -> None:
    hp = dict(lr=0.01, betas=(0.9, 0.99, 0.999), alpha=4.0, alpha_warmup=60, beta3_warmup=80, weight_decay=0.1)
    _compare("ademamix", hp, ademamix_ref(0.01, 0.9, 0.99, 0.999, 4.0, 60, 80, 1e-8, 0.1), path)


def test_ademamix_without_the_fast_ema_keeps_two_state_tensors() -> None:
    hp = dict(lr=0.01, betas=(0.0, 0.99, 0.999), alpha=2.0, beta3_warmup=50)
    _compare("ademamix", hp, ademamix_ref(0.01, 0.0, 0.99, 0.999, 2.0, None, 50, 1e-8, 0.0), {"foreach": True})
    params = make_params()
    opt = stochopt.AdEMAMix(params, betas=(0.0, 0.99, 0.999))
    run(opt, params, 1)
    assert set(opt.state[params[0]]) == {"step", "exp_avg_slow", "exp_avg_sq"}


@pytest.mark.parametrize("decouple,clip", [(True, True), (False, False)], ids=["decoupled-clipped", "l2-unclipped"])
def test_adopt_equals_the_authors_package(path: dict, decouple: bool, clip: bool) -> None:
    from adopt import ADOPT as AuthorsADOPT

    extra = {} if clip else {"clip_lambda": None}
    hp = dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.02, decouple=decouple, **extra)
    params, expected = make_params(), make_params()
    run(stochopt.create_optimizer("adopt", params, **hp, **path), params, STEPS)
    run(AuthorsADOPT(expected, foreach=False, **hp), expected, STEPS)
    assert_same(params, expected, rtol=1e-11, atol=1e-12)


def test_adopt_first_step_moves_nothing_even_for_huge_gradients() -> None:
    p = torch.zeros(4, requires_grad=True)
    opt = stochopt.ADOPT([p], clip_lambda=None)
    p.grad = torch.full((4,), 3e38)
    opt.step()
    assert torch.equal(p.detach(), torch.zeros(4)) and torch.isfinite(opt.state[p]["exp_avg"]).all()


@pytest.mark.parametrize("optimize_1d", [False, True], ids=["adamw-1d", "mars-1d"])
def test_mars_is_the_paper_update(path: dict, optimize_1d: bool) -> None:
    hp = dict(lr=0.01, betas=(0.95, 0.99), weight_decay=0.1, gamma=0.05, optimize_1d=optimize_1d, lr_1d=0.02)
    hp.update(betas_1d=(0.9, 0.95), weight_decay_1d=0.05)
    reference = mars_ref(0.01, 0.95, 0.99, 1e-8, 0.1, 0.05, 0.02, (0.9, 0.95), 0.05, optimize_1d)
    _compare("mars", hp, reference, path)


def test_mars_1d_rate_follows_a_scheduler() -> None:
    """The 1-D rate is lr * lr_1d / lr_0: halving lr halves it."""
    params = [torch.zeros(3, requires_grad=True)]
    opt = stochopt.MARS(params, lr=0.01, lr_1d=0.04, weight_decay_1d=0.0)
    for group in opt.param_groups:
        group["lr"] = 0.005
    params[0].grad = torch.ones(3)
    opt.step()  # AdamW's first step moves every coordinate by the rate
    torch.testing.assert_close(params[0].detach(), torch.full((3,), -0.02), rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", ["adamw", "lion", "sgd"])
def test_cautious_is_the_masked_update(path: dict, name: str) -> None:
    hp = {
        "adamw": dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.1),
        "lion": dict(lr=0.003, betas=(0.9, 0.99), weight_decay=0.1),
        "sgd": dict(lr=0.01, momentum=0.9, weight_decay=0.01),
    }[name]
    b1, b2 = hp.get("betas", (0.0, 0.0))
    reference = cautious_ref(name, hp["lr"], b1, b2, 1e-8, hp["weight_decay"], hp.get("momentum", 0.0))
    _compare(name, {**hp, "cautious": True}, reference, path)


@pytest.mark.parametrize("name", ["ademamix", "adopt", "mars"])
def test_cautious_changes_the_new_optimizers_updates(name: str) -> None:
    """cautious=True reaches their kernels (the mask itself is checked above against the paper's loop)."""
    plain, masked = make_params(), make_params()
    run(stochopt.create_optimizer(name, plain, lr=0.01), plain, 20)
    run(stochopt.create_optimizer(name, masked, lr=0.01, cautious=True), masked, 20)
    assert not torch.allclose(plain[0], masked[0])


def test_cautious_is_refused_where_there_is_nothing_to_mask() -> None:
    params = make_params()
    with pytest.raises(ValueError, match="momentum > 0"):
        stochopt.SGD(params, lr=0.1, cautious=True)
    with pytest.raises(ValueError, match="Adagrad does not support cautious=True"):
        stochopt.Adagrad([{"params": params, "cautious": True}])
    with pytest.raises(TypeError, match="cautious must be True or False"):
        stochopt.AdamW(params, cautious=1)


def test_cautious_fused_takes_the_compiled_kernel_not_torchs() -> None:
    """torch's fused AdamW kernel has no mask: fused=True with cautious=True must not run it."""
    a, b = make_params(), make_params()
    run(stochopt.AdamW(a, lr=0.01, cautious=True, fused=True), a, 5)
    run(stochopt.AdamW(b, lr=0.01, cautious=True, foreach=False), b, 5)
    assert_same(a, b, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize(
    "name,hp,pattern",
    [
        ("ademamix", dict(betas=(0.9, 0.999)), r"betas must be a tuple \(beta1, beta2, beta3\)"),
        ("ademamix", dict(alpha=-1.0), "alpha must be"),
        ("ademamix", dict(alpha_warmup=0), "alpha_warmup must be an int >= 1"),
        ("ademamix", dict(beta3_warmup=2.5), "beta3_warmup must be an int"),
        ("adopt", dict(clip_lambda=0.25), "clip_lambda must be a function"),
        ("adopt", dict(eps=0.0), "eps must be"),
        ("mars", dict(gamma=-0.1), "gamma must be"),
        ("mars", dict(betas_1d=(0.9,)), r"betas_1d must be a tuple"),
    ],
)
def test_bad_values_are_named(name: str, hp: dict, pattern: str) -> None:
    with pytest.raises((ValueError, TypeError), match=pattern):
        stochopt.create_optimizer(name, make_params(), **hp)
