"""StepInBackward: stepping each parameter from its post-accumulate-grad hook gives the ordinary optimizer's
results (stochopt's and torch's, with param groups, a tied weight and a schedule), resumes bit-exactly, holds one
gradient at a time, and refuses by name what cannot be split per parameter."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import stochopt
from stochopt.training import MasterWeights, StepInBackward

GEN = torch.Generator().manual_seed(3)
X = torch.randn(20, 32, 16, generator=GEN, dtype=torch.float64)  # 20 batches of 32
Y = torch.sin(X[..., :3].sum(-1, keepdim=True))


def make_model(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
    ).to(dtype)


def loss_of(model: nn.Module, step: int) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    return nn.functional.mse_loss(model(X[step].to(dtype)), Y[step].to(dtype))


def train(model, opt, steps, start=0, scheduler=None) -> None:
    """The ordinary loop; under StepInBackward its step() is the no-op and backward steps."""
    for t in range(start, start + steps):
        opt.zero_grad()
        loss_of(model, t % len(X)).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def groups(model) -> list[dict]:
    # two groups with their own options: weights decay, biases do not and take a smaller lr
    weights = [p for p in model.parameters() if p.ndim > 1]
    biases = [p for p in model.parameters() if p.ndim == 1]
    return [{"params": weights, "weight_decay": 0.1}, {"params": biases, "weight_decay": 0.0, "lr": 3e-3}]


FACTORIES = {
    "stochopt.AdamW": lambda params: stochopt.AdamW(params, lr=1e-2, weight_decay=0.05),
    "torch.SGD-momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01),
}


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)], ids=["float64", "float32"])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_equals_the_ordinary_step_after_backward(name, dtype, tol):
    make = FACTORIES[name]
    ordinary = make_model(dtype)
    fused = copy.deepcopy(ordinary)
    train(ordinary, make(groups(ordinary)), 25)
    opt = StepInBackward(groups(fused), make)
    train(fused, opt, 25)
    moved = sum((p - make_model(dtype).state_dict()[k]).abs().max() for k, p in ordinary.state_dict().items())
    assert moved > 0.1  # the comparison is not between two models that stayed put
    for a, b in zip(ordinary.parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)
    assert all(p.grad is None for p in fused.parameters())
    assert len(opt.param_groups) == len(opt.optimizers) == len(list(fused.parameters()))


def test_a_parameter_used_twice_steps_once_on_its_whole_gradient():
    torch.manual_seed(1)
    shared = nn.Linear(16, 16).double()
    head = nn.Linear(16, 1).double()
    model = nn.ModuleList([shared, head])
    other = copy.deepcopy(model)

    def loss(m, t):  # the shared layer twice: two contributions to one gradient per backward
        return nn.functional.mse_loss(m[1](torch.tanh(m[0](torch.tanh(m[0](X[t]))))), Y[t])

    ordinary = stochopt.AdamW(model.parameters(), lr=1e-2)
    fused = StepInBackward(other.parameters(), lambda params: stochopt.AdamW(params, lr=1e-2))
    steps = []
    fused.optimizers[0].register_step_post_hook(lambda opt, args, kwargs: steps.append(1))
    for t in range(20):
        ordinary.zero_grad()
        loss(model, t).backward()
        ordinary.step()
        loss(other, t).backward()
    assert len(steps) == 20  # once per backward, not once per use
    for a, b in zip(model.parameters(), other.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_a_torch_scheduler_drives_every_parameters_lr():
    make = FACTORIES["stochopt.AdamW"]
    ordinary, fused = make_model(), make_model()
    ordinary_opt, opt = make(groups(ordinary)), StepInBackward(groups(fused), make)
    sched = torch.optim.lr_scheduler.StepLR(ordinary_opt, step_size=4, gamma=0.5)
    fused_sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    train(ordinary, ordinary_opt, 20, scheduler=sched)
    with warnings.catch_warnings():  # no "lr_scheduler.step() before optimizer.step()": step() is called
        warnings.simplefilter("error")
        train(fused, opt, 20, scheduler=fused_sched)
    assert fused_sched.get_last_lr()[0] == pytest.approx(1e-2 * 0.5**5)
    assert [opt.optimizers[-1].param_groups[0]["lr"]] == [pytest.approx(3e-3 * 0.5**5)]
    for a, b in zip(ordinary.parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_resume_is_bit_exact():
    def build():
        model = make_model(torch.float32)
        opt = StepInBackward(groups(model), FACTORIES["stochopt.AdamW"])
        return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)

    model, opt, sched = build()
    train(model, opt, 6, scheduler=sched)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    other, other_opt, other_sched = build()
    other.load_state_dict(saved["model"])
    other_opt.load_state_dict(saved["opt"])
    other_sched.load_state_dict(saved["sched"])
    train(model, opt, 6, start=6, scheduler=sched)
    train(other, other_opt, 6, start=6, scheduler=other_sched)
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    assert other_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**4)
    with pytest.raises(ValueError, match="holds 7 optimizers but this StepInBackward has 8"):
        other_opt.load_state_dict({"optimizers": saved["opt"]["optimizers"][:7]})
    with pytest.raises(ValueError, match="not saved by StepInBackward"):
        other_opt.load_state_dict(opt.optimizers[0].state_dict())


def live_gradient_peak(model, opt_builder) -> tuple[int, int]:
    """The most gradient bytes alive at once during one backward, and the bytes of all gradients: read by a
    hook registered before the optimizer's, so it runs first, when this parameter's gradient has just been
    completed and the earlier ones are freed (StepInBackward) or still held (an ordinary backward)."""
    params = list(model.parameters())
    peak = [0]

    def record(_):
        peak[0] = max(peak[0], sum(p.grad.nbytes for p in params if p.grad is not None))

    handles = [p.register_post_accumulate_grad_hook(record) for p in params]
    opt = opt_builder(params)
    for t in range(3):
        opt.zero_grad()
        loss_of(model, t).backward()
        opt.step()
    for h in handles:
        h.remove()
    return peak[0], sum(p.nbytes for p in params)


def test_backward_holds_one_gradient_instead_of_all():
    make = FACTORIES["stochopt.AdamW"]
    model = make_model(torch.float32)
    largest = max(p.nbytes for p in model.parameters())
    fused_peak, all_bytes = live_gradient_peak(model, lambda params: StepInBackward(params, make))
    assert all(p.grad is None for p in model.parameters())
    ordinary_peak, _ = live_gradient_peak(make_model(torch.float32), make)
    assert fused_peak == largest == 64 * 64 * 4  # one 64x64 float32 weight's gradient: 16 KiB
    assert ordinary_peak == all_bytes == 4 * (16 * 64 + 2 * 64 * 64 + 64 + 3 * 64 + 1)  # every gradient: 37 KiB


def test_master_weights_step_in_backward_per_parameter():
    # a bfloat16 model with float32 masters, stepped per parameter: the wrappers compose
    model = make_model(torch.float32).bfloat16()
    reference = copy.deepcopy(model)
    opt = StepInBackward(model.parameters(), lambda params: MasterWeights(torch.optim.SGD(params, lr=0.05)))
    ref_opt = MasterWeights(torch.optim.SGD(reference.parameters(), lr=0.05))
    train(model, opt, 20)
    train(reference, ref_opt, 20)
    for a, b in zip(reference.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_zero_grad_and_closure():
    model = make_model()
    opt = StepInBackward(model.parameters(), FACTORIES["torch.SGD-momentum"])
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        loss = loss_of(model, 0)
        loss.backward()  # steps every parameter
        return loss

    loss = opt.step(closure)
    assert loss.ndim == 0 and all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    model[0].weight.grad = torch.ones_like(model[0].weight)  # set by hand: zero_grad frees it
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    opt.remove_hooks()
    loss_of(model, 0).backward()  # hooks off: an ordinary backward that steps nothing
    assert all(p.grad is not None for p in model.parameters())


def linear() -> nn.Linear:
    return nn.Linear(4, 2)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: StepInBackward(linear().parameters(), torch.optim.LBFGS), ValueError, "LBFGS: needs a closure"),
        (lambda: StepInBackward(linear().parameters(), stochopt.Newton), ValueError, "Newton: needs a closure"),
        (lambda: StepInBackward(linear().parameters(), stochopt.Prodigy), ValueError, "Prodigy: its step size d"),
        (lambda: StepInBackward(linear().parameters(), stochopt.AdaFisher), ValueError, "AdaFisher"),
        (lambda: StepInBackward(linear().parameters(), stochopt.SGDScheduleFree), ValueError, "SGDScheduleFree"),
        (
            lambda: StepInBackward(linear().parameters(), lambda ps: stochopt.Lookahead(stochopt.Prodigy(ps))),
            ValueError,
            "Prodigy",
        ),
        (
            lambda: StepInBackward(linear().parameters(), lambda ps: stochopt.AdamW(ps, nonfinite="skip")),
            ValueError,
            "nonfinite='skip'",
        ),
        (lambda: StepInBackward(linear().parameters(), stochopt.AdamW(linear().parameters())), TypeError, "function"),
        (lambda: StepInBackward(linear().parameters(), 0.1), TypeError, "make_optimizer"),
        (lambda: StepInBackward(linear().weight, stochopt.AdamW), TypeError, "got a Tensor"),
        (lambda: StepInBackward([], stochopt.AdamW), ValueError, "params is empty"),
        (lambda: StepInBackward([torch.zeros(3)], stochopt.AdamW), ValueError, "parameter 0 .* requires grad"),
        (lambda: StepInBackward([linear().weight] * 2, stochopt.AdamW), ValueError, "parameter 1 .* given twice"),
        (lambda: StepInBackward(linear().parameters(), lambda ps: None), TypeError, "must return"),
        (
            lambda: StepInBackward(linear().parameters(), lambda ps: torch.optim.SGD(linear().parameters(), lr=1)),
            ValueError,
            "one parameter .* of 2 parameters",
        ),
    ],
)
def test_what_cannot_step_per_parameter_is_refused_by_name(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("name", ["Lamb", "Lars", "Adafactor", "Lion", "Muon", "Shampoo", "SOAP", "MARS"])
def test_optimizers_with_per_tensor_updates_run_unchanged(name):
    # trust ratios, factored moments, orthogonalized and preconditioned updates: each reads one tensor
    cls = getattr(stochopt, name)
    ordinary, fused = make_model(), make_model()
    train(ordinary, cls(ordinary.parameters(), lr=1e-2), 10)
    train(fused, StepInBackward(fused.parameters(), lambda params: cls(params, lr=1e-2)), 10)
    for a, b in zip(ordinary.parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
