"""Adaptive gradient clipping against its formula, unit by unit; the clipping helper's reported norm."""

from __future__ import annotations

import pytest
import torch

from stochopt.training import adaptive_clip_grad_, clip_gradients


def params_with_grads(seed=0, grad_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (4, 3, 2, 2), (7,), (1,)]
    params = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in shapes]
    for p in params:
        # units of very different gradient sizes, so that some are clipped and some are not
        scale = torch.logspace(-3, 0, p.shape[0], dtype=torch.float64).view(-1, *[1] * (p.ndim - 1))
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale * grad_scale
    params[0].detach()[2].zero_()  # a unit whose weights are all zero: eps decides its bound
    return params


def agc_reference(w, g, clipping, eps):
    """Brock et al. (2021), eq. 3, written per unit: rows of a 2+-D weight, the whole of a vector."""
    out = g.clone()
    units = [slice(None)] if w.ndim <= 1 else range(w.shape[0])
    for i in units:
        w_norm = max(w[i].norm().item(), eps)
        g_norm = g[i].norm().item()
        if g_norm / w_norm > clipping:
            out[i] = clipping * w_norm / g_norm * g[i]
    return out


@pytest.mark.parametrize("clipping, eps", [(0.01, 1e-3), (0.1, 1e-3), (0.5, 0.3)])
def test_agc_matches_its_formula(clipping, eps):
    params = params_with_grads()
    expected = [agc_reference(p.detach(), p.grad, clipping, eps) for p in params]
    count = adaptive_clip_grad_(params, clipping=clipping, eps=eps)
    changed = 0
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=1e-15)
    for p, e, before in zip(params, expected, [q.grad for q in params_with_grads()]):
        units = 1 if p.ndim <= 1 else p.shape[0]
        changed += sum(not torch.equal(e.reshape(units, -1)[i], before.reshape(units, -1)[i]) for i in range(units))
    assert 0 < count.item() == changed


def test_agc_leaves_small_and_zero_gradients_alone():
    w = torch.ones(3, 4, requires_grad=True)
    w.grad = torch.zeros(3, 4)
    w.grad[0] = 1e-6
    adaptive_clip_grad_([w], clipping=0.01)
    assert torch.equal(w.grad[1:], torch.zeros(2, 4)) and torch.equal(w.grad[0], torch.full((4,), 1e-6))


def test_clip_gradients_reports_the_norm_before_clipping():
    params = params_with_grads(grad_scale=10.0)
    total = torch.cat([p.grad.flatten() for p in params]).norm()
    result = clip_gradients(params, max_norm=1.0)
    assert result.norm.item() == pytest.approx(total.item(), rel=1e-12)
    assert result.clipped_units is None
    assert torch.cat([p.grad.flatten() for p in params]).norm().item() == pytest.approx(1.0, rel=1e-6)


def test_clip_gradients_applies_value_then_agc_then_norm():
    params, reference = params_with_grads(grad_scale=10.0), params_with_grads(grad_scale=10.0)
    result = clip_gradients(params, max_value=0.5, agc=0.1, max_norm=2.0)
    torch.nn.utils.clip_grad_value_(reference, 0.5)
    adaptive_clip_grad_(reference, clipping=0.1)
    torch.nn.utils.clip_grad_norm_(reference, 2.0)
    for p, q in zip(params, reference):
        assert torch.equal(p.grad, q.grad)
    assert result.clipped_units.item() > 0


def test_parameters_without_gradients_are_skipped():
    a, b = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    a.grad = torch.tensor([3.0, 4.0, 0.0])
    assert clip_gradients([a, b], agc=1.0).norm.item() == pytest.approx(5.0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda ps: adaptive_clip_grad_(ps, clipping=0.0), "clipping"),
        (lambda ps: adaptive_clip_grad_(ps, eps=-1.0), "eps"),
        (lambda ps: clip_gradients(ps, max_norm=-1.0), "max_norm"),
        (lambda ps: clip_gradients(ps, max_value=0), "max_value"),
    ],
)
def test_bad_arguments_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call(params_with_grads())


def test_nonfinite_norm_can_raise():
    params = params_with_grads()
    params[0].grad[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_gradients(params, max_norm=1.0, error_if_nonfinite=True)
