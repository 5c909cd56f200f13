"""AdaFisher: factors and steps against a reference written here from the paper's equations (100 steps, float64,
with and without gradient centralization), the normalization of constant diagonals, gradient accumulation, training
an MLP and a small CNN, resume, and the Adam step of the other parameters. Under DDP: tests/distributed."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stochopt
from stochopt.data import digits
from stochopt.optim.adafisher import min_max_normalize
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


def minmax(d: torch.Tensor) -> torch.Tensor:
    """The paper's min-max normalization (d - min) / (max - min) of a diagonal, its guard e relative to the scale
    and in the numerator too (so that a constant diagonal maps to 1, as AdaFisher documents)."""
    e = 1e-12 * d.max() + torch.finfo(d.dtype).tiny
    return (d - d.min() + e) / (d.max() - d.min() + e)


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4, bias=False), nn.LayerNorm(4), nn.Linear(4, 3))


def cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 2, bias=False),
                         nn.Flatten(), nn.Linear(36, 3))  # fmt: skip


class Reference:
    """AdaFisher written here from the paper's equations, on a copy of the model, with every Kronecker layer's
    weight and bias as one matrix [W | b] (out x (in + 1)): per step H = MinMax(diag(a^T a)/n) over the rows a of
    the layer's inputs (1 appended for the bias; a conv's patches), S = MinMax(diag(s^T s)/n) over its output
    gradients, EMAs of both from 1, F = S H^T + damping, m <- b1 m + (1 - b1) g, and
    theta <- (1 - lr wd) theta - lr / (1 - b1^t) m / F; Adam (decoupled decay) for the other parameters."""

    def __init__(self, model: nn.Module, lr, betas, gamma, damping, eps, weight_decay, centralize=False) -> None:
        self.model = copy.deepcopy(model)
        self.hp = lr, betas, gamma, damping, eps, weight_decay
        self.centralize, self.t = centralize, 0
        self.layers = [m for m in self.model if isinstance(m, (nn.Linear, nn.Conv2d))]
        self.factors = {m: (torch.ones(m.weight[0].numel() + (m.bias is not None), dtype=torch.float64),
                            torch.ones(m.weight.size(0), dtype=torch.float64)) for m in self.layers}  # fmt: skip
        self.moments = {m: torch.zeros(m.weight.size(0), m.weight[0].numel() + (m.bias is not None),
                                       dtype=torch.float64) for m in self.layers}  # fmt: skip
        others = [p for m in self.model if m not in self.factors for p in m.parameters()]
        self.adam = {p: (torch.zeros_like(p), torch.zeros_like(p)) for p in others}

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        lr, (beta1, beta2), gamma, damping, eps, wd = self.hp
        self.t += 1
        inputs, outputs, h = {}, {}, x
        for module in self.model:
            if module in self.factors:
                inputs[module] = h.detach()
            h = module(h)
            if module in self.factors:
                outputs[module] = h
                h.retain_grad()
        self.model.zero_grad()
        F.cross_entropy(h, y).backward()
        with torch.no_grad():
            for m in self.layers:
                a, s = inputs[m], outputs[m].grad
                if isinstance(m, nn.Conv2d):
                    a, s = patches(a, m), s.permute(0, 2, 3, 1).reshape(-1, s.size(1))
                if m.bias is not None:
                    a = torch.cat([a, torch.ones(a.size(0), 1, dtype=a.dtype)], dim=1)
                h_new, s_new = minmax((a.T @ a).diagonal() / a.size(0)), minmax((s.T @ s).diagonal() / s.size(0))
                h_d, s_d = self.factors[m]
                self.factors[m] = h_d, s_d = gamma * h_d + (1 - gamma) * h_new, gamma * s_d + (1 - gamma) * s_new
                w = m.weight.grad.reshape(m.weight.size(0), -1)
                if self.centralize:  # of the weight only (the matrix), not of the bias
                    w = w - w.mean(dim=1, keepdim=True)
                g = torch.cat([w, m.bias.grad[:, None]], dim=1) if m.bias is not None else w
                self.moments[m] = beta1 * self.moments[m] + (1 - beta1) * g
                theta = m.weight.reshape(m.weight.size(0), -1)
                theta = torch.cat([theta, m.bias[:, None]], dim=1) if m.bias is not None else theta
                theta = (1 - lr * wd) * theta - lr / (1 - beta1**self.t) * self.moments[m] / (
                    s_d[:, None] * h_d[None, :] + damping
                )
                m.weight.copy_(theta[:, : m.weight[0].numel()].reshape(m.weight.shape))
                if m.bias is not None:
                    m.bias.copy_(theta[:, -1])
            for p, (mo, v) in self.adam.items():
                mo.mul_(beta1).add_((1 - beta1) * p.grad)
                v.mul_(beta2).add_((1 - beta2) * p.grad**2)
                p.mul_(1 - lr * wd)
                p.sub_(lr / (1 - beta1**self.t) * mo / (v.sqrt() / math.sqrt(1 - beta2**self.t) + eps))


@pytest.mark.parametrize("centralized", [False, True], ids=["plain", "centralized"])
@pytest.mark.parametrize("build, shape", [(mlp, (10, 6)), (cnn, (4, 2, 7, 7))], ids=["mlp", "cnn"])
def test_factors_and_steps_equal_the_paper_over_100_steps(build, shape, centralized) -> None:
    """100 steps in float64 against the reference written above; centralized: the gradients of the weights (the
    engine's ``centralize_gradients``: matrices only) centralized by hand in the reference, p.grad unchanged."""
    torch.manual_seed(0)
    model = build().double()
    # lr 0.003: at 0.01 the centralized CNN's steps (up to lr / damping per entry) blow up on these random batches
    hp = dict(lr=0.003, betas=(0.9, 0.99), gamma=0.8, damping=1e-3, eps=1e-8, weight_decay=0.01)
    ref = Reference(model, **hp, centralize=centralized)
    opt = stochopt.AdaFisher(model, **hp)
    if centralized:
        stochopt.gradient_centralization(opt)
    start = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    for _ in range(100):
        x, y = torch.randn(shape, generator=gen, dtype=torch.float64), torch.randint(0, 3, (shape[0],), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        ref.step(x, y)
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))  # p.grad left as it was
        for p, q in zip(model.parameters(), ref.model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
        for m, r in zip(model, ref.model):
            if r in ref.factors:
                h_d, s_d = ref.factors[r]
                torch.testing.assert_close(opt.state[m.weight]["fisher_in"], h_d[: m.weight[0].numel()])
                torch.testing.assert_close(opt.state[m.weight]["fisher_out"], s_d)
                if m.bias is not None:
                    torch.testing.assert_close(opt.state[m.bias]["fisher_in"], h_d[-1:])
    moved = max((p - q).abs().max().item() for p, q in zip(model.parameters(), start.parameters()))
    assert moved > 0.1  # the comparison is not between two models that stayed put
    if build is mlp:  # LayerNorm is not a Kronecker layer: it gets Adam's state
        assert set(opt.state[model[3].weight]) == {"step", "exp_avg", "exp_avg_sq"}


def test_min_max_normalize_maps_a_constant_diagonal_to_one() -> None:
    """A constant diagonal (one element: the output factor of a layer with one output) carries no relative
    information: it maps to 1, at any scale; otherwise the max maps to 1, the min to ~0, scale-free."""
    for d in [torch.tensor([3.7]), torch.full((5,), 2.5), torch.zeros(4), torch.tensor([1e-30]), torch.ones(1)]:
        for dtype in (torch.float32, torch.float64):
            assert torch.equal(min_max_normalize(d.to(dtype)), torch.ones_like(d, dtype=dtype)), d
    d = torch.tensor([0.5, 2.0, 1.0, 4.5], dtype=torch.float64)
    torch.testing.assert_close(min_max_normalize(d), (d - 0.5) / 4.0, rtol=0, atol=1e-11)
    torch.testing.assert_close(min_max_normalize(d * 1e-20), min_max_normalize(d), rtol=1e-14, atol=0)


def test_a_one_output_head_keeps_its_fisher() -> None:
    """4-16-1 MLP, MSE: the head's one-element output factor is constant. Normalized to 0 (the official code's
    min-max) its Fisher decays to damping and its step grows by up to 1/damping; here its Fisher stays of the
    size of the hidden layer's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    x, y = torch.randn(64, 4, dtype=torch.float64), torch.randn(64, 1, dtype=torch.float64)
    opt = stochopt.AdaFisher(model, lr=1e-3, damping=1e-3)
    for _ in range(50):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()

    def fisher(w: torch.Tensor) -> torch.Tensor:
        return opt.state[w]["fisher_out"][:, None] * opt.state[w]["fisher_in"][None, :] + 1e-3

    hidden, head = fisher(model[0].weight).mean(), fisher(model[2].weight).mean()
    assert head > hidden / 3 and head > 0.05, (head, hidden)  # the official code's: head ~ 3 damping
    assert torch.equal(opt.state[model[2].weight]["fisher_out"], torch.ones(1, dtype=torch.float64))


def test_gradient_accumulation_equals_one_big_batch() -> None:
    """Two micro-batches (loss / 2 each) give one big batch's factors: the passes' raw sums are normalized once."""
    torch.manual_seed(0)
    one, two = mlp().double(), mlp().double()
    two.load_state_dict(one.state_dict())
    opt_one, opt_two = stochopt.AdaFisher(one, lr=0.01, gamma=0.5), stochopt.AdaFisher(two, lr=0.01, gamma=0.5)
    gen = torch.Generator().manual_seed(2)
    for _ in range(10):
        x, y = torch.randn(16, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen)
        x[:8] *= 3.0  # the halves differ in scale: per-pass normalization would weigh them differently
        opt_one.zero_grad()
        F.cross_entropy(one(x), y).backward()
        opt_one.step()
        opt_two.zero_grad()
        for half in (slice(0, 8), slice(8, 16)):
            (F.cross_entropy(two(x[half]), y[half]) / 2).backward()
        opt_two.step()
    for p, q in zip(one.parameters(), two.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


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
    with pytest.raises(ValueError, match="eps"):
        stochopt.AdaFisher(model, eps=0.0)
    with pytest.raises(TypeError, match="process_group"):
        stochopt.AdaFisher(model, process_group="gloo")
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
