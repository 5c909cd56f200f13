"""Mixed precision: bfloat16 weights with float32 masters track float32 training where pure bfloat16 drifts;
the memory report; resume; the float16 loss-scaling path (run on the CPU); micro-batch gradients summed in
float32 (accumulate_in_float32) against a float64 sum and an independent loop."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import stochopt
from stochopt.training import MasterWeights, MixedPrecision

GEN = torch.Generator().manual_seed(1)
X = torch.randn(256, 16, generator=GEN)
Y = torch.sin(X[:, :3].sum(1, keepdim=True))


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))


def loss_of(model: nn.Module) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    return nn.functional.mse_loss(model(X.to(dtype)).float(), Y)


def train(model, opt, steps, scheduler=None) -> None:
    for _ in range(steps):
        opt.zero_grad()
        loss_of(model).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


@pytest.mark.parametrize("cls", [torch.optim.Adam, stochopt.Adam], ids=["torch", "stochopt"])
def test_master_weights_track_float32_where_pure_bfloat16_drifts(cls):
    # lr 1e-4: Adam's steps are ~1e-4, below half a bfloat16 ulp of most weights (~4e-4 at 0.2)
    base = make_model()
    start = flat(base)
    fp32 = copy.deepcopy(base)
    train(fp32, cls(fp32.parameters(), lr=1e-4), 300)
    master = copy.deepcopy(base).bfloat16()
    train(master, MasterWeights(cls(master.parameters(), lr=1e-4)), 300)
    pure = copy.deepcopy(base).bfloat16()
    train(pure, cls(pure.parameters(), lr=1e-4), 300)

    moved = (flat(fp32) - start).norm()
    assert (flat(master) - flat(fp32)).norm() < 0.05 * moved  # measured: 0.017
    assert (flat(pure) - flat(fp32)).norm() > 0.5 * moved  # measured: 0.95
    assert loss_of(master).item() == pytest.approx(loss_of(fp32).item(), rel=0.01)
    assert loss_of(pure).item() > 1.2 * loss_of(fp32).item()  # measured: 0.44 against 0.34


def test_memory_is_the_seeds_sixteen_bytes_per_parameter():
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256)).bfloat16()
    n = sum(p.numel() for p in model.parameters())
    opt = MasterWeights(torch.optim.Adam(model.parameters(), lr=1e-3))
    model(torch.ones(8, 256, dtype=torch.bfloat16)).sum().backward()
    opt.step()
    memory = opt.memory()
    state_bytes = sum(t.nbytes for s in opt.state.values() for t in s.values())
    assert (memory.params, memory.grads, memory.master_weights, memory.step_buffers) == (2 * n, 2 * n, 4 * n, 4 * n)
    assert memory.optimizer_state == state_bytes and state_bytes >= 8 * n
    assert 16.0 <= memory.bytes_per_param < 16.01
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(t.dtype == torch.float32 for s in opt.state.values() for t in s.values() if t.ndim > 0)


def test_float32_parameters_pass_through_and_grads_are_freed():
    model = make_model()
    model[0].bfloat16()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = MasterWeights(inner)
    assert inner.param_groups[0]["params"][2] is model[2].weight  # float32: the model's own tensor
    assert inner.param_groups[0]["params"][0] is not model[0].weight
    opt.zero_grad()
    model[2](model[1](model[0](X.bfloat16())).float()).sum().backward()
    before = model[0].weight.detach().clone()
    opt.step()
    assert not torch.equal(model[0].weight, before)
    assert all(p.grad is None for p in inner.param_groups[0]["params"][:2])


def test_resume_is_bit_exact_and_schedulers_work():
    def build():
        model = make_model().bfloat16()
        opt = MasterWeights(stochopt.AdamW(model.parameters(), lr=1e-3))
        return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)

    model, opt, sched = build()
    train(model, opt, 5, sched)
    saved = copy.deepcopy({"opt": opt.state_dict(), "sched": sched.state_dict()})
    other, other_opt, other_sched = build()
    other_opt.load_state_dict(saved["opt"])
    other_sched.load_state_dict(saved["sched"])
    assert torch.equal(flat(other), flat(model))  # the model's weights come from the loaded masters
    train(model, opt, 5, sched)
    train(other, other_opt, 5, other_sched)
    assert torch.equal(flat(other), flat(model))
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5**3)


@pytest.mark.parametrize("accumulate", [False, True], ids=["half-grads", "float32-grads"])
def test_float16_loss_scaling_skips_overflowing_steps(accumulate):
    model = make_model().half()
    opt = MasterWeights(torch.optim.SGD(model.parameters(), lr=0.05), accumulate_in_float32=accumulate)
    mp = MixedPrecision("cpu", dtype=torch.float16)
    assert mp.scaler.is_enabled()
    start = loss_of(model).item()
    for step in range(40):  # step 10 overflows
        opt.zero_grad()
        with mp.autocast():
            loss = loss_of(model)
        mp.backward(loss)
        if step == 10:  # under accumulate_in_float32 the scaled gradient is already in the master's .grad
            (opt.master_parameters()[0] if accumulate else model[0].weight).grad[0, 0] = float("inf")
            before, scale = flat(model), mp.scaler.get_scale()
        mp.unscale_(opt)
        mp.step(opt)
        if step == 10:
            assert torch.equal(flat(model), before) and mp.scaler.get_scale() == scale / 2
        assert all(m.grad is None for m in opt.master_parameters())  # freed after a skipped step too
    reference = make_model()  # float32, 39 steps: the overflowing step did not count
    train(reference, torch.optim.SGD(reference.parameters(), lr=0.05), 39)
    assert loss_of(model).item() < 0.75 * start
    assert loss_of(model).item() == pytest.approx(loss_of(reference).item(), rel=0.01)


def test_bfloat16_autocast_on_cpu_needs_no_scaler():
    mp = MixedPrecision("cpu")
    assert mp.dtype == torch.bfloat16 and not mp.scaler.is_enabled()
    with mp.autocast():
        assert nn.Linear(4, 4)(torch.ones(2, 4)).dtype == torch.bfloat16
    with MixedPrecision("cpu", enabled=False).autocast():
        assert nn.Linear(4, 4)(torch.ones(2, 4)).dtype == torch.float32


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: MasterWeights(torch.optim.SGD), TypeError, "the class SGD"),
        (lambda: MasterWeights(torch.optim.SGD(make_model().parameters(), lr=0.1)), ValueError, "no bfloat16"),
        (lambda: MixedPrecision("tpu"), ValueError, "device_type"),
        (
            lambda: MasterWeights(torch.optim.SGD(make_model().bfloat16().parameters()), accumulate_in_float32=1),
            TypeError,
            "accumulate_in_float32 must be a bool, got 1",
        ),
        (lambda: MixedPrecision("cpu", dtype=torch.float64), ValueError, "dtype"),
    ],
)
def test_bad_input_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_wrapping_after_the_first_step_is_refused():
    model = make_model().bfloat16()
    inner = torch.optim.Adam(model.parameters(), lr=1e-3)
    train(model, inner, 1)
    with pytest.raises(ValueError, match="before its first step"):
        MasterWeights(inner)


def micro_batch_grads(model, batches) -> list[list[torch.Tensor]]:
    """Each micro-batch's gradient on its own, as a fresh backward computes it (bfloat16 for a bfloat16 model)."""
    return [torch.autograd.grad(loss, list(model.parameters())) for loss in (loss_fn(model, b) for b in batches)]


def loss_fn(model, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x.bfloat16()).float(), y) / 4


BATCHES = list(zip(X.split(64), Y.split(64)))  # 4 micro-batches of 64


def test_float32_accumulation_keeps_what_a_bfloat16_sum_rounds_away():
    # micro-batch gradients 1, 2^-9, 2^-9, 2^-9: each 1 + 2^-9 is below half a bfloat16 ulp of 1 (2^-8)
    inputs = [torch.ones(1, 4)] + [torch.full((1, 4), 2.0**-9)] * 3
    results = {}
    for accumulate in (False, True):
        model = nn.Linear(4, 1, bias=False).bfloat16()
        opt = MasterWeights(torch.optim.SGD(model.parameters(), lr=0.1), accumulate_in_float32=accumulate)
        for x in inputs:
            model(x.bfloat16()).sum().backward()
        assert (model.weight.grad is None) == accumulate
        opt.pull_gradients()
        results[accumulate] = opt.master_parameters()[0].grad
    assert torch.equal(results[False], torch.ones(1, 4))  # the old behaviour: three micro-batches lost
    assert torch.equal(results[True], torch.full((1, 4), 1 + 3 * 2.0**-9))


def test_float32_accumulated_gradient_is_the_float64_sum_of_the_micro_batches():
    model = make_model().bfloat16()
    reference = [sum(g.double() for g in gs) for gs in zip(*micro_batch_grads(model, BATCHES))]
    summed = {}
    for accumulate in (False, True):
        opt = MasterWeights(torch.optim.SGD(model.parameters(), lr=0.1), accumulate_in_float32=accumulate)
        for batch in BATCHES:
            loss_fn(model, batch).backward()
        opt.pull_gradients()
        summed[accumulate] = [m.grad.double() for m in opt.master_parameters()]
        if accumulate:
            assert all(p.grad is None for p in model.parameters()) and all(
                m.grad.dtype == torch.float32 for m in opt.master_parameters()
            )
            # the model's parameters hold no gradient: clip the masters
            norm = stochopt.training.clip_gradients(opt.master_parameters(), max_norm=1e9).norm
            assert norm.item() == pytest.approx(torch.cat([g.flatten() for g in reference]).norm().item(), rel=1e-6)
            assert stochopt.training.clip_gradients(model.parameters(), max_norm=1e9).norm.item() == 0.0
        opt.zero_grad()
        opt.remove_hooks()
    scale = max(g.abs().max().item() for g in reference)
    for got, want in zip(summed[True], reference):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7 * scale)
    # bfloat16 partial sums: errors of a bfloat16 ulp, far outside float32's tolerance (measured: 3.5e-3 of the
    # largest entry, where the float32 sum is exact)
    error = max((got - want).abs().max().item() for got, want in zip(summed[False], reference))
    assert error > 1e-3 * scale


def test_training_with_float32_accumulation_equals_an_independent_loop():
    model = make_model().bfloat16()
    replica = copy.deepcopy(model)  # the loop's bfloat16 model: its weights are set from the loop's masters
    opt = MasterWeights(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), accumulate_in_float32=True)
    masters = [p.detach().float() for p in replica.parameters()]
    momentum = [None] * len(masters)
    for step in range(25):
        batches = BATCHES[step % 2 :] + BATCHES[: step % 2]  # the order of the micro-batches changes
        opt.zero_grad()
        for batch in batches:
            loss_fn(model, batch).backward()
        opt.step()
        # the loop: each micro-batch's bfloat16 gradient in float32, summed in order; torch's SGD momentum
        grads = zip(*micro_batch_grads(replica, batches))
        with torch.no_grad():
            for i, (w, gs) in enumerate(zip(masters, grads)):
                g = sum((g.float() for g in gs[1:]), gs[0].float())
                momentum[i] = g.clone() if momentum[i] is None else momentum[i].mul_(0.9).add_(g)
                w.add_(momentum[i], alpha=-0.05)
            for p, w in zip(replica.parameters(), masters):
                p.copy_(w)
    start = flat(make_model())
    assert (torch.cat([w.flatten() for w in masters]) - start).norm() > 0.1
    for got, want in zip(opt.master_parameters(), masters):
        assert torch.equal(got, want)  # the same float32 operations in the same order
    assert torch.equal(flat(model), flat(replica))


def test_memory_of_float32_accumulation():
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256)).bfloat16()
    n = sum(p.numel() for p in model.parameters())
    opt = MasterWeights(torch.optim.Adam(model.parameters(), lr=1e-3), accumulate_in_float32=True)
    for _ in range(2):
        model(torch.ones(8, 256, dtype=torch.bfloat16)).sum().backward()
    held = sum(m.grad.nbytes for m in opt.master_parameters()) + sum(
        p.grad.nbytes for p in model.parameters() if p.grad is not None
    )
    opt.step()
    memory = opt.memory()
    assert held == memory.grads == 4 * n  # between backward and step: the float32 sums, no bfloat16 gradient
    assert (memory.params, memory.master_weights, memory.step_buffers) == (2 * n, 4 * n, 0)
    assert memory.peak == memory.total and 18.0 <= memory.bytes_per_param < 18.01  # 16 + 4 at the old step's peak
    assert all(m.grad is None for m in opt.master_parameters())
