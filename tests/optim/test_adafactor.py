"""Adafactor against torch.optim.Adafactor, against a reference loop with the first moment, and its memory."""

from __future__ import annotations

import pytest
import torch

import stochopt
from tests.conftest import assert_same, clone_params, make_params, run
from tests.optim.test_references import reference_run

# conv-like 4-D weights are factored over their last two dimensions
SHAPES = [(300, 256), (7, 5), (11,), (3, 4, 2, 2), (1,)]


@pytest.mark.parametrize("hp", [dict(lr=0.01), dict(lr=0.05, weight_decay=0.1, d=2.0, eps=(1e-20, 1e-3))])
def test_matches_torch_adafactor(hp: dict, path: dict) -> None:
    ours = make_params(SHAPES)
    ref = clone_params(ours)
    opt = stochopt.Adafactor(ours, **hp, **path)
    decay = lambda t: 0.99**t  # noqa: E731
    run(opt, ours, 200, scheduler=torch.optim.lr_scheduler.LambdaLR(opt, decay))
    ref_opt = torch.optim.Adafactor(ref, **hp)
    run(ref_opt, ref, 200, scheduler=torch.optim.lr_scheduler.LambdaLR(ref_opt, decay))
    assert_same(ours, ref, rtol=1e-10, atol=1e-12)


def test_large_conv_weights_and_short_matrices_match_torch(path: dict) -> None:
    """Large enough for the compiled kernel: a conv weight (3 rows in its factored dimensions), a matrix of 20
    rows and one of 16 (the column mean's special cases, see mean_over_rows)."""
    shapes = [(128, 64, 3, 3), (20, 4000), (16, 4100)]
    ours, ref = make_params(shapes), make_params(shapes)
    run(stochopt.Adafactor(ours, lr=0.01, **path), ours, 50)
    run(torch.optim.Adafactor(ref, lr=0.01), ref, 50)
    assert_same(ours, ref, rtol=1e-10, atol=1e-12)


def adafactor_ref(lr, c, eps1, eps2, d, wd, beta1):
    """The paper's Algorithms 4-5 with torch's epsilon placement and a first moment on the clipped update."""

    def update(t, p, g, st):
        rho = min(lr, t**-0.5)
        alpha = max(eps2, (p.norm() / p.numel() ** 0.5).item()) * rho
        p.mul_(1 - lr * wd)
        w = t**c  # 1 - beta2_t
        if p.dim() > 1:
            st["R"] = (1 - w) * st.get("R", torch.zeros(p.shape[:-1] + (1,), dtype=p.dtype)) + w * (g * g).mean(
                -1, keepdim=True
            )
            col_shape = p.shape[:-2] + (1, p.shape[-1])
            st["C"] = (1 - w) * st.get("C", torch.zeros(col_shape, dtype=p.dtype)) + w * (g * g).mean(-2, keepdim=True)
            v = st["R"] @ st["C"] / torch.clamp(st["R"].mean(-2, keepdim=True), min=eps1)
        else:
            st["V"] = (1 - w) * st.get("V", torch.zeros_like(p)) + w * g * g
            v = st["V"]
        u = g / torch.sqrt(torch.clamp(v, min=eps1 * eps1))
        u_hat = u / max(1.0, (u.norm() / u.numel() ** 0.5).item() / d)
        st["m"] = beta1 * st.get("m", torch.zeros_like(p)) + (1 - beta1) * u_hat
        p -= alpha * st["m"]

    return update


def test_first_moment_matches_reference_loop(path: dict) -> None:
    ours = make_params(SHAPES)
    ref = clone_params(ours)
    hp = dict(lr=0.02, beta2_decay=-0.7, eps=(1e-30, 1e-3), d=1.0, weight_decay=0.01, beta1=0.9)
    run(stochopt.Adafactor(ours, **hp, **path), ours, 200)
    reference_run(ref, 200, adafactor_ref(0.02, -0.7, 1e-30, 1e-3, 1.0, 0.01, 0.9))
    assert_same(ours, ref, rtol=1e-10, atol=1e-12)


def test_state_of_a_4096_square_matrix_is_under_one_percent_of_adams() -> None:
    sizes = {}
    for cls in (stochopt.Adafactor, stochopt.Adam):
        w = torch.zeros(4096, 4096, requires_grad=True)
        w.grad = torch.ones_like(w)
        opt = cls([w])
        opt.step()
        sizes[cls.__name__] = sum(t.numel() * t.element_size() for t in opt.state[w].values())
        del opt, w
    assert sizes["Adafactor"] <= 0.01 * sizes["Adam"], sizes
    assert sizes["Adafactor"] == (4096 + 4096) * 4 + 4  # row and column statistics, and the step


def test_lr_none_is_the_papers_relative_step() -> None:
    a, b = make_params(), make_params()
    run(stochopt.Adafactor(a, lr=None), a, 20)
    run(stochopt.Adafactor(b, lr=1e-2), b, 20)
    assert_same(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("lr, rho", [(None, 1e-2), (1.0, 1.0), (0.3, 0.3)])
def test_first_step_is_the_relative_step_times_rms(lr, rho) -> None:
    """Step 1 in closed form: 1 - beta2_1 = 1, so V = g^2, U = sign(g), RMS(U) = 1 (no clipping) and
    theta_1 = theta_0 - max(eps2, RMS(theta_0)) min(lr, 1/sqrt(1)) sign(g)."""
    gen = torch.Generator().manual_seed(0)
    for scale in (1.0, 1e-5):  # RMS(theta_0) above eps2, and below it
        p = (torch.randn(1000, generator=gen, dtype=torch.float64) * scale).requires_grad_()
        p.grad = torch.randn(1000, generator=gen, dtype=torch.float64)
        start = p.detach().clone()
        stochopt.Adafactor([p], lr=lr).step()
        alpha = max(1e-3, start.pow(2).mean().sqrt().item()) * rho
        torch.testing.assert_close(p.detach(), start - alpha * p.grad.sign(), rtol=1e-12, atol=1e-15)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="beta2_decay"):
        stochopt.Adafactor(make_params(), beta2_decay=0.5)
    with pytest.raises(TypeError, match="eps"):
        stochopt.Adafactor(make_params(), eps=1e-3)
    with pytest.raises(ValueError, match="beta1"):
        stochopt.Adafactor(make_params(), beta1=1.0)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(eps=(0.0, 1e-3)), ValueError, r"eps\[0\] must be a finite number > 0, got 0.0: .*0/0"),
        (dict(eps=(None, 0.0)), ValueError, r"eps\[1\] must be a finite number > 0, got 0.0: .*never moves"),
        (dict(d=None), TypeError, r"d \(the update clipping threshold\) must be a number, got NoneType None"),
        (dict(d="1"), TypeError, r"d \(the update clipping threshold\) must be a number, got str"),
        (dict(d=0.5), ValueError, r"d \(the update clipping threshold\) must be a number >= 1, got 0.5"),
        (dict(beta2_decay=None), TypeError, r"beta2_decay must be a number, got NoneType"),
    ],
)
def test_values_that_can_only_give_nan_or_nonsense_are_refused(kwargs, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        stochopt.Adafactor(make_params(), **kwargs)


def test_smallest_eps1_keeps_a_never_seen_coordinate_finite() -> None:
    """eps1 = 0 made 0/0 on a coordinate whose gradient is always 0, and RMS clipping spread the NaN over the
    whole tensor; any eps1 > 0 (here the dtype's tiniest) keeps it finite."""
    p = torch.randn(8, 6, dtype=torch.float64).requires_grad_()
    opt = stochopt.Adafactor([p], lr=0.01, eps=(torch.finfo(torch.float64).tiny, 1e-3))
    for _ in range(3):
        p.grad = torch.randn(8, 6, dtype=torch.float64)
        p.grad[:, 0] = 0.0
        opt.step()
    assert torch.isfinite(p).all()
