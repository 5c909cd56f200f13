"""Ranger equals RAdam + Lookahead + gradient centralization composed by hand; centralization on its own."""

from __future__ import annotations

import pytest
import torch

import stochopt
from tests.conftest import assert_same, clone_params, make_params, run, set_grads


def _centralized(g: torch.Tensor) -> torch.Tensor:
    if g.dim() < 2:
        return g
    return g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True)


@pytest.mark.parametrize("k,alpha", [(6, 0.5), (3, 0.8)])
def test_ranger_is_radam_lookahead_and_centralization(k: int, alpha: float, path: dict) -> None:
    ours = make_params()
    ref = clone_params(ours)
    hp = dict(lr=0.01, betas=(0.95, 0.999), eps=1e-5, weight_decay=0.01)
    run(stochopt.Ranger(ours, **hp, k=k, alpha=alpha, **path), ours, 200)
    # by hand: torch's RAdam on centralized gradients, and the lookahead equations every k steps
    radam = torch.optim.RAdam(ref, **hp)
    slow = [p.detach().clone() for p in ref]
    for t in range(200):
        set_grads(ref, t)
        for p in ref:
            p.grad = _centralized(p.grad)
        radam.step()
        if (t + 1) % k == 0:
            with torch.no_grad():
                for p, s in zip(ref, slow):
                    s += alpha * (p - s)
                    p.copy_(s)
    assert_same(ours, ref, rtol=1e-10, atol=1e-12)


def test_centralization_switches_on_for_any_stochopt_optimizer() -> None:
    ours = make_params()
    ref = clone_params(ours)
    opt = stochopt.AdamW(ours, lr=0.01)
    assert stochopt.gradient_centralization(opt) is None
    ref_opt = torch.optim.AdamW(ref, lr=0.01)
    for t in range(50):
        set_grads(ours, t)
        set_grads(ref, t)
        grads_before = [p.grad.clone() for p in ours]
        for p in ref:
            p.grad = _centralized(p.grad)
        opt.step()
        ref_opt.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(ours, grads_before)), "p.grad is left as it was"
    assert_same(ours, ref)
    opt.add_param_group({"params": [torch.zeros(3, 3, requires_grad=True)]})
    assert opt.param_groups[-1]["centralize_gradients"] is True


def test_centralization_hook_on_a_torch_optimizer() -> None:
    ours = make_params()
    ref = clone_params(ours)
    opt = torch.optim.SGD(ours, lr=0.1, momentum=0.9)
    handle = stochopt.gradient_centralization(opt)
    ref_opt = torch.optim.SGD(ref, lr=0.1, momentum=0.9)
    for t in range(20):
        set_grads(ours, t)
        set_grads(ref, t)
        for p in ref:
            p.grad = _centralized(p.grad)
        opt.step()
        ref_opt.step()
    assert_same(ours, ref)
    handle.remove()
    with pytest.raises(TypeError, match="Optimizer"):
        stochopt.gradient_centralization(object())


def test_ranger_validates_k_and_alpha() -> None:
    with pytest.raises(ValueError, match="k must be"):
        stochopt.Ranger(make_params(), k=0)
    with pytest.raises(ValueError, match="alpha"):
        stochopt.Ranger(make_params(), alpha=1.5)


def test_ranger_equals_the_lookahead_wrapper_around_centralized_radam() -> None:
    ours = make_params()
    ref = clone_params(ours)
    hp = dict(lr=0.01, betas=(0.95, 0.999), eps=1e-5, weight_decay=0.01)
    run(stochopt.Ranger(ours, **hp, k=4, alpha=0.6), ours, 60)
    inner = stochopt.RAdam(ref, **hp)
    stochopt.gradient_centralization(inner)
    run(stochopt.Lookahead(inner, k=4, alpha=0.6), ref, 60)
    assert_same(ours, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor"])
def test_fused_path_centralizes_inside_its_kernel(name: str) -> None:
    """Tensors large enough for the compiled kernel (which then centralizes g itself, rows kept), a conv-like
    4-D weight among them, against the loop path; the gradients stay as they were."""
    shapes = [(300, 256), (128, 64, 3, 3), (7, 5), (11,)]
    ours, ref = make_params(shapes), make_params(shapes)
    groups = lambda ps: [{"params": ps, "centralize_gradients": True}]  # noqa: E731
    fused = stochopt.create_optimizer(name, groups(ours), lr=0.01, fused=True)
    loop = stochopt.create_optimizer(name, groups(ref), lr=0.01, foreach=False)
    for t in range(30):
        set_grads(ours, t)
        set_grads(ref, t)
        before = [p.grad.clone() for p in ours]
        fused.step()
        loop.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(ours, before))
    assert_same(ours, ref, rtol=1e-10, atol=1e-12)
    moved = [(p - q).abs().max().item() for p, q in zip(ours, make_params(shapes))]
    assert min(moved) > 0
