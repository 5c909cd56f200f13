"""LAMB and LARS against reference loops written from the papers' equations (float64, 200 steps, every path)."""

from __future__ import annotations

import re

import pytest
import torch

import stochopt
from tests.conftest import assert_same, clone_params, make_params, run
from tests.optim.test_references import reference_run


def _ratio(num: torch.Tensor, den: torch.Tensor, guard: torch.Tensor | None = None) -> torch.Tensor:
    ok = num > 0 and den > 0 and (guard is None or guard > 0)
    return num / den if ok else torch.tensor(1.0, dtype=num.dtype)


def lamb_ref(lr, b1, b2, eps, wd, max_ratio, adapt=True):
    def update(t, p, g, st):
        st["m"] = b1 * st.get("m", torch.zeros_like(p)) + (1 - b1) * g
        st["v"] = b2 * st.get("v", torch.zeros_like(p)) + (1 - b2) * g * g
        u = (st["m"] / (1 - b1**t)) / (torch.sqrt(st["v"] / (1 - b2**t)) + eps) + wd * p
        r = _ratio(p.norm(), u.norm()) if adapt else torch.tensor(1.0, dtype=p.dtype)
        if max_ratio is not None:
            r = torch.clamp(r, max=max_ratio)
        p -= lr * r * u

    return update


def lars_ref(lr, mu, wd, tc, eps, exclude_1d=True):
    def update(t, p, g, st):
        adapt = p.dim() > 1 or not exclude_1d
        if adapt:
            local = _ratio(tc * p.norm(), g.norm() + wd * p.norm() + eps, guard=g.norm())
            step = lr * local * (g + wd * p)
        else:
            step = lr * g
        st["b"] = mu * st.get("b", torch.zeros_like(p)) + step
        p -= st["b"]

    return update


CASES = [
    (
        "Lamb",
        dict(lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01),
        lamb_ref(0.01, 0.9, 0.99, 1e-6, 0.01, None),
    ),
    (
        "Lamb",
        dict(lr=0.01, weight_decay=0.1, max_trust_ratio=0.5),
        lamb_ref(0.01, 0.9, 0.999, 1e-6, 0.1, 0.5),
    ),
    ("Lamb", dict(lr=0.01, trust_ratio=False), lamb_ref(0.01, 0.9, 0.999, 1e-6, 0.0, None, adapt=False)),
    (
        "Lars",
        dict(lr=0.5, momentum=0.9, weight_decay=0.01, trust_coefficient=0.02),
        lars_ref(0.5, 0.9, 0.01, 0.02, 1e-8),
    ),
    (
        "Lars",
        dict(lr=0.5, momentum=0.8, weight_decay=0.01, trust_coefficient=0.02, exclude_1d=False),
        lars_ref(0.5, 0.8, 0.01, 0.02, 1e-8, exclude_1d=False),
    ),
]


@pytest.mark.parametrize("name,hp,update", CASES, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(CASES)])
def test_matches_reference_loop(name: str, hp: dict, update, path: dict) -> None:
    ours = make_params()
    ref = clone_params(ours)
    run(getattr(stochopt, name)(ours, **hp, **path), ours, 200)
    reference_run(ref, 200, update)
    assert_same(ours, ref, rtol=1e-10, atol=1e-10)


def test_trust_ratio_is_one_for_a_zero_parameter() -> None:
    """A zero-initialized tensor (a bias, say) must still move: its trust ratio is 1, not 0."""
    p = torch.zeros(4, 3, requires_grad=True)
    p.grad = torch.ones(4, 3)
    stochopt.Lamb([p], lr=0.1).step()
    assert torch.allclose(p, torch.full((4, 3), -0.1), atol=1e-5)


def test_lamb_groups_exclude_biases_from_trust_ratio_and_decay() -> None:
    """The paper's usage: biases and norm weights in a group without trust ratio or decay equal AdamW
    without decay on those parameters."""
    torch.manual_seed(0)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    same = bias.detach().clone().requires_grad_()
    lamb = stochopt.Lamb([{"params": [bias], "trust_ratio": False, "weight_decay": 0.0}], lr=0.01, eps=1e-6)
    adam = torch.optim.Adam([same], lr=0.01, eps=1e-6)
    for _ in range(50):
        g = torch.randn(5, dtype=torch.float64)
        bias.grad, same.grad = g.clone(), g.clone()
        lamb.step()
        adam.step()
    # Adam's epsilon sits outside sqrt(v_hat) in both: the two are the same method on this group
    torch.testing.assert_close(bias, same, rtol=1e-12, atol=1e-12)


def test_lamb_fused_step_allocates_no_tensor_sized_buffer(monkeypatch) -> None:
    """inductor recomputes LAMB's update u in the loop that writes p (``realize_reads_threshold``, see
    ``Lamb._compile_options``): stored, u was a tensor-sized buffer allocated on every step (docs/speed.md)."""
    from torch._inductor.utils import run_and_get_code

    from stochopt.engine import fused

    for key in [k for k in fused._KERNELS if k[0] is stochopt.Lamb._update]:
        monkeypatch.delitem(fused._KERNELS, key)  # a fresh kernel is compiled, and its code captured
    params = [torch.randn(64, 32, requires_grad=True), torch.randn(300, requires_grad=True)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = stochopt.Lamb(params, weight_decay=0.01, fused=True)
    with torch._inductor.config.patch(fx_graph_cache=False):
        _, codes = run_and_get_code(opt.step)
    shapes = re.findall(r"empty_strided_cpu\(\((.*?)\)", "\n".join(codes))
    assert shapes, "no compiled code was captured"
    assert all(shape == "" for shape in shapes), shapes  # the norms' scalars only
