"""Every optimizer torch.optim also has, against torch.optim: 200 float64 steps, every execution path, two
param groups with their own hyperparameters, and a scheduler changing lr every step."""

from __future__ import annotations

import pytest
import torch

import stochopt
from tests.conftest import assert_same, clone_params, make_params, run

CASES = [
    ("SGD", dict(lr=0.05)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, maximize=True)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=0.01)),
    ("RMSprop", dict(lr=0.01, weight_decay=0.01)),
    ("RMSprop", dict(lr=0.01, momentum=0.9, centered=True)),
    ("Adadelta", dict(lr=0.5, rho=0.8, weight_decay=0.01)),
    ("Adam", dict(lr=0.01, weight_decay=0.01)),
    ("Adam", dict(lr=0.01, amsgrad=True, maximize=True)),
    ("Adam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    ("NAdam", dict(lr=0.01, weight_decay=0.01, momentum_decay=0.01)),
    ("NAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("RAdam", dict(lr=0.01, weight_decay=0.01)),
    ("RAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
]


def _groups(params: list[torch.Tensor], hp: dict) -> list[dict]:
    """Two groups; the second overrides lr (and weight decay where the case has one)."""
    second = {"params": params[2:], "lr": hp["lr"] * 0.5}
    if hp.get("weight_decay"):
        second["weight_decay"] = hp["weight_decay"] * 2
    return [{"params": params[:2]}, second]


@pytest.mark.parametrize("name,hp", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_matches_torch(name: str, hp: dict, path: dict) -> None:
    ours_params = make_params()
    ref_params = clone_params(ours_params)
    ours = getattr(stochopt, name)(_groups(ours_params, hp), **hp, **path)
    ref = getattr(torch.optim, name)(_groups(ref_params, hp), **hp, foreach=False)
    decay = lambda t: 0.99**t  # noqa: E731
    run(ours, ours_params, 200, scheduler=torch.optim.lr_scheduler.LambdaLR(ours, decay))
    run(ref, ref_params, 200, scheduler=torch.optim.lr_scheduler.LambdaLR(ref, decay))
    assert_same(ours_params, ref_params)
    for p, q in zip(ours_params, ref_params):
        for key, value in ref.state[q].items():
            torch.testing.assert_close(ours.state[p][key], value, rtol=1e-12, atol=1e-12, check_dtype=False)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop"])
@pytest.mark.parametrize("direction", ["torch->stochopt", "stochopt->torch"])
def test_state_dict_moves_between_libraries(name: str, direction: str) -> None:
    """Train 20 steps in one library, load its state_dict into the other, continue 20: same as never switching."""
    hp = {"lr": 0.01, "weight_decay": 0.01}
    if name in ("SGD", "RMSprop"):
        hp["momentum"] = 0.9
    first_cls, second_cls = getattr(torch.optim, name), getattr(stochopt, name)
    if direction == "stochopt->torch":
        first_cls, second_cls = second_cls, first_cls
    params = make_params()
    straight = clone_params(params)
    first = first_cls(params, **hp)
    run(first, params, 20)
    second = second_cls(params, **hp)
    second.load_state_dict(first.state_dict())
    run(second, params, 20, start=20)
    reference = first_cls(straight, **hp)
    run(reference, straight, 40)
    assert_same(params, straight)


@pytest.mark.parametrize("name,hp", [c for c in CASES if getattr(stochopt, c[0])._native_fused is not None])
def test_compiled_kernel_matches_torch_where_torch_has_a_fused_kernel(name: str, hp: dict) -> None:
    """On the CPU, fused=True uses torch's own fused kernel for these; our compiled kernel (used on CUDA and for
    low-precision parameters) is checked here by switching the native kernel off."""
    compiled_only = type(f"{name}Compiled", (getattr(stochopt, name),), {"_native_fused": None})
    ours_params = make_params()
    ref_params = clone_params(ours_params)
    run(compiled_only(ours_params, **hp, fused=True), ours_params, 200)
    run(getattr(torch.optim, name)(ref_params, **hp, foreach=False), ref_params, 200)
    # fused multiply-adds round differently; the maximizing SGD case grows params to ~1e6
    assert_same(ours_params, ref_params, rtol=1e-10)
