"""AdaFisher: factors and steps against a computation written here from the layer inputs and output gradients,
training an MLP and a small CNN, resume, and the Adam step of the other parameters."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stochopt
from stochopt.data import digits
from tests.conftest import assert_same, clone_params, make_params, run


def patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Rows of kernel-sized input patches, one per (example, output position), by explicit slicing."""
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    x = F.pad(x, (pw, pw, ph, ph))
    rows = []
    for n in range(x.size(0)):
        for i in range(0, x.size(2) - kh + 1, sh):
            for j in range(0, x.size(3) - kw + 1, sw):
                rows.append(x[n, :, i : i + kh, j : j + kw].reshape(-1))
    return torch.stack(rows)


def normalized(d: torch.Tensor) -> torch.Tensor:
    return (d - d.min()) / (d.max() - d.min() + 1e-12)


def direct_factors(layer: nn.Module, x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """diag(a^T a)/n and diag(s^T s)/n from full second-moment matrices, min-max normalized."""
    if isinstance(layer, nn.Conv2d):
        a, s = patches(x, layer), s.permute(0, 2, 3, 1).reshape(-1, s.size(1))
    else:
        a = x
    if layer.bias is not None:
        a = torch.cat([a, torch.ones(a.size(0), 1, dtype=a.dtype)], dim=1)
    return normalized((a.T @ a).diagonal() / a.size(0)), normalized((s.T @ s).diagonal() / s.size(0))


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4, bias=False), nn.LayerNorm(4), nn.Linear(4, 3))


def cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 2, bias=False),
                         nn.Flatten(), nn.Linear(36, 3))  # fmt: skip


@pytest.mark.parametrize("build, shape", [(mlp, (10, 6)), (cnn, (4, 2, 7, 7))], ids=["mlp", "cnn"])
def test_factors_and_steps_equal_the_direct_computation(build, shape) -> None:
    torch.manual_seed(0)
    model = build().double()
    lr, beta1, gamma, damping = 0.01, 0.9, 0.8, 1e-3
    opt = stochopt.AdaFisher(model, lr=lr, betas=(beta1, 0.999), gamma=gamma, damping=damping)
    layers = [m for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]
    factors = {m: (torch.ones(sum(m.weight[0].numel() for _ in [0]) + (m.bias is not None), dtype=torch.float64),
                   torch.ones(m.weight.size(0), dtype=torch.float64)) for m in layers}  # fmt: skip
    moments = {m: torch.zeros_like(m.weight) for m in layers}
    for t in range(1, 4):
        x = torch.randn(shape, dtype=torch.float64)
        inputs, outputs, h = {}, {}, x
        for module in model:
            if module in factors:
                inputs[module] = h.detach()
            h = module(h)
            if module in factors:
                outputs[module] = h
                h.retain_grad()
        opt.zero_grad()
        F.cross_entropy(h, torch.arange(shape[0]) % 3).backward()
        before = {m: m.weight.detach().clone() for m in layers}
        opt.step()
        for m in layers:
            h_new, s_new = direct_factors(m, inputs[m], outputs[m].grad)
            factors[m] = (gamma * factors[m][0] + (1 - gamma) * h_new, gamma * factors[m][1] + (1 - gamma) * s_new)
            state = opt.state[m.weight]
            h_diag, s_diag = factors[m]
            torch.testing.assert_close(state["fisher_in"], h_diag[: m.weight[0].numel()])
            torch.testing.assert_close(state["fisher_out"], s_diag)
            if m.bias is not None:
                torch.testing.assert_close(opt.state[m.bias]["fisher_in"], h_diag[-1:])
            moments[m] = beta1 * moments[m] + (1 - beta1) * m.weight.grad
            fisher = (s_diag[:, None] * h_diag[None, : m.weight[0].numel()] + damping).view_as(m.weight)
            expected = before[m] - lr / (1 - beta1**t) * moments[m] / fisher
            torch.testing.assert_close(m.weight.detach(), expected)
    norm = model[3] if build is mlp else None
    if norm is not None:  # LayerNorm is not a Kronecker layer: it gets Adam's state
        assert set(opt.state[norm.weight]) == {"step", "exp_avg", "exp_avg_sq"}


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, **hp) -> list[float]:
    opt = stochopt.AdaFisher(model, **hp)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_trains_an_mlp_and_a_cnn_on_digits() -> None:
    train, _ = digits()
    x, y = train.tensors[0][:512], train.tensors[1][:512]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    losses = _train(net, x, y, 60, lr=0.1)
    assert losses[-1] < 0.25 * losses[0], losses[::10]
    assert (net(x).argmax(1) == y).float().mean() > 0.9
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(216, 10))
    losses = _train(conv, x, y, 60, lr=0.1)
    assert losses[-1] < 0.25 * losses[0], losses[::10]
    assert (conv(x).argmax(1) == y).float().mean() > 0.9


def test_resume_with_factors_is_bit_exact() -> None:
    torch.manual_seed(0)
    model = mlp().double()
    other = copy.deepcopy(model)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.arange(8) % 3

    def run(m: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()

    opt = stochopt.AdaFisher(model, lr=0.01, weight_decay=0.01)
    run(model, opt, 3)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    other.load_state_dict(model.state_dict())
    resumed = stochopt.AdaFisher(other, lr=0.01, weight_decay=0.01)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    run(model, opt, 3)
    run(other, resumed, 3)
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)


def test_plain_params_take_adamw_steps() -> None:
    params = make_params([(5, 4), (3,)])
    ref_params = clone_params(params)
    opt = stochopt.AdaFisher(params, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    ref = torch.optim.AdamW(ref_params, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    run(opt, params, 10)
    run(ref, ref_params, 10)
    assert_same(params, ref_params, rtol=1e-12, atol=1e-12)


def test_registry_passes_the_model_and_options_are_checked() -> None:
    model = mlp()
    opt = stochopt.create_optimizer("adafisher", model, lr=1e-3)
    assert opt.param_groups[0]["kronecker"] and len(opt.param_groups[0]["params"]) == 5  # 3 weights, 2 biases
    with pytest.raises(ValueError, match="kronecker=True"):
        stochopt.AdaFisher([{"params": make_params([(3, 3)]), "kronecker": True}])
    with pytest.raises(ValueError, match="gamma"):
        stochopt.AdaFisher(model, gamma=1.0)
    with pytest.raises(ValueError, match="damping"):
        stochopt.AdaFisher(model, damping=0.0)
    opt.remove_hooks()
    model(torch.randn(2, 6)).sum().backward()
    assert not opt._pending


def test_kronecker_path_keeps_the_contract() -> None:
    """What the generic contract suite checks on plain params, on the Kronecker path: maximize is minimizing the
    negated loss, bfloat16 layers keep float32 state, a group with lr=0 stays put."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 6), torch.arange(8) % 3
    up, down = mlp(), mlp()
    down.load_state_dict(up.state_dict())
    opt_up, opt_down = stochopt.AdaFisher(up, lr=0.01, maximize=True), stochopt.AdaFisher(down, lr=0.01)
    for _ in range(3):
        opt_up.zero_grad()
        F.cross_entropy(up(x), y).backward()
        opt_up.step()
        opt_down.zero_grad()
        (-F.cross_entropy(down(x), y)).backward()
        opt_down.step()
    for p, q in zip(up.parameters(), down.parameters()):
        assert torch.equal(p, q)

    low = mlp().bfloat16()
    opt = stochopt.AdaFisher(low, lr=0.01)
    opt.param_groups[1]["lr"] = 0.0  # the LayerNorm's Adam group
    frozen = low[3].weight.detach().clone()
    first = low[0].weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(low(x.bfloat16()).float(), y).backward()
        opt.step()
    assert opt.state[low[0].weight]["fisher_in"].dtype == torch.float32
    assert opt.state[low[0].weight]["exp_avg"].dtype == torch.float32
    assert low[0].weight.dtype == torch.bfloat16 and not torch.equal(low[0].weight, first)
    assert torch.equal(low[3].weight, frozen)
