"""Muon against torch.optim.Muon, its AdamW part against AdamW, the ownership rule and the group helper."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stochopt
from stochopt.optim.muon import default_ns_dtype, newton_schulz
from tests.conftest import clone_params, make_params, run, set_grads

MATRICES = [(24, 16), (16, 40), (9, 9)]


@pytest.mark.parametrize(
    "options",
    [
        {},
        dict(lr=0.02, weight_decay=0.0, nesterov=False),
        dict(lr=0.01, momentum=0.9, adjust_lr_fn="match_rms_adamw"),
        dict(lr=0.02, ns_coefficients=(3.0, -3.2, 1.2), ns_steps=3, eps=1e-5, adjust_lr_fn="original"),
    ],
    ids=["defaults", "no-nesterov", "match-rms", "coefficients"],
)
def test_muon_equals_torch_muon_on_matrices(options) -> None:
    ours = make_params(MATRICES, dtype=torch.float32)
    theirs = clone_params(ours)
    # torch iterates in bfloat16 on every device; stochopt's default is float32 on CPUs without native bfloat16
    opt, ref = stochopt.Muon(ours, ns_dtype=torch.bfloat16, **options), torch.optim.Muon(theirs, **options)
    run(opt, ours, 100)
    run(ref, theirs, 100)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])
    assert not torch.equal(ours[0], make_params(MATRICES, dtype=torch.float32)[0])


def test_conv_weights_are_flattened_matrices() -> None:
    conv = make_params([(6, 3, 2, 2)], dtype=torch.float32)
    flat = [conv[0].detach().reshape(6, 12).clone().requires_grad_()]
    opt, ref = stochopt.Muon(conv, lr=0.02, ns_dtype=torch.bfloat16), torch.optim.Muon(flat, lr=0.02)
    for t in range(20):
        set_grads(conv, t)
        flat[0].grad = conv[0].grad.reshape(6, 12)
        opt.step()
        ref.step()
    torch.testing.assert_close(conv[0].reshape(6, 12), flat[0], rtol=1e-5, atol=1e-6)


def test_newton_schulz_orthogonalizes() -> None:
    g = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 1e-3
    singular = torch.linalg.svdvals(newton_schulz(g, dtype=torch.float32))
    # the quintic iteration leaves singular values near 1, not at 1 (Jordan et al.: roughly 0.7 to 1.2)
    assert singular.min() > 0.6 and singular.max() < 1.25
    assert newton_schulz(g).dtype == default_ns_dtype(g.device)
    assert newton_schulz(g, dtype=torch.bfloat16).dtype == torch.bfloat16
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    x, q = newton_schulz(g, dtype=torch.float32).double(), u @ vh
    assert (x * q).sum() / (x.norm() * q.norm()) > 0.95  # nearly the direction of U V^T


def test_other_params_get_adamw() -> None:
    """Vectors (default rule) and a use_muon=False matrix follow torch.optim.AdamW with adamw_betas/adamw_eps."""
    params = make_params([(8, 5), (7,), (3,)])
    vector_ref = clone_params(params[1:])
    head = make_params([(4, 6)], seed=1)
    head_ref = clone_params(head)
    opt = stochopt.Muon(
        [{"params": params}, {"params": head, "use_muon": False, "lr": 3e-3}],
        lr=0.01, weight_decay=0.05, adamw_betas=(0.8, 0.99), adamw_eps=1e-6,
    )  # fmt: skip
    ref = torch.optim.AdamW(
        [{"params": vector_ref}, {"params": head_ref, "lr": 3e-3}], lr=0.01, betas=(0.8, 0.99), eps=1e-6,
        weight_decay=0.05,
    )  # fmt: skip
    for t in range(30):
        set_grads(params + head, t)
        for p, q in zip(params[1:] + head, vector_ref + head_ref):
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(params[1:] + head, vector_ref + head_ref):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    assert set(opt.state[params[0]]) == {"step", "momentum_buffer"}
    assert set(opt.state[head[0]]) == {"step", "exp_avg", "exp_avg_sq"}


def test_use_muon_true_sends_vectors_to_muon() -> None:
    v = make_params([(6,)])
    opt = stochopt.Muon([{"params": v, "use_muon": True}], lr=0.1)
    set_grads(v, 0)
    opt.step()
    assert set(opt.state[v[0]]) == {"step", "momentum_buffer"}


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.block = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 50)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.block(self.embed(ids))))


def test_param_groups_helper_and_training() -> None:
    torch.manual_seed(0)
    model = TinyLM()
    groups = stochopt.muon_param_groups(model, adamw_lr=3e-3)
    muon_ids = {id(p) for p in groups[0]["params"]}
    assert groups[0]["use_muon"] and not groups[1]["use_muon"] and groups[1]["lr"] == 3e-3
    assert muon_ids == {id(model.block[0].weight), id(model.block[2].weight)}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))
    named = stochopt.muon_param_groups(model, head="block.2")
    assert id(model.block[2].weight) not in {id(p) for p in named[0]["params"]}
    with pytest.raises(ValueError, match="head 'nope'"):
        stochopt.muon_param_groups(model, head="nope")

    opt = stochopt.Muon(groups, lr=0.02)
    ids = torch.randint(0, 50, (64,), generator=torch.Generator().manual_seed(0))
    targets = (ids * 7 + 3) % 50
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(ids), targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_bad_options_are_named() -> None:
    params = make_params([(4, 4)])
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        stochopt.Muon(params, adjust_lr_fn="rms")
    with pytest.raises(TypeError, match="ns_coefficients"):
        stochopt.Muon(params, ns_coefficients=(1.0, 2.0))
    with pytest.raises(ValueError, match="ns_steps"):
        stochopt.Muon(params, ns_steps=0)
    with pytest.raises(TypeError, match="use_muon"):
        stochopt.Muon([{"params": params, "use_muon": "yes"}])
    with pytest.raises(TypeError, match="distributed"):
        stochopt.Muon(params, distributed=1)


def test_create_optimizer_with_a_model_follows_muons_rule() -> None:
    """create_optimizer("muon", model) builds muon_param_groups (the class's params_from_module hook), not the
    generic weight-decay groups: the embedding and the output head train with AdamW, hidden matrices with Muon;
    it steps exactly as Muon built by hand from the helper's groups."""
    torch.manual_seed(0)
    model = TinyLM()
    twin = TinyLM()
    twin.load_state_dict(model.state_dict())
    opt = stochopt.create_optimizer("muon", model, lr=0.02, weight_decay=0.01)
    by_hand = stochopt.Muon(stochopt.muon_param_groups(twin), lr=0.02, weight_decay=0.01)
    assert [g["use_muon"] for g in opt.param_groups] == [True, False]
    muon_owned = {id(p) for p in opt.param_groups[0]["params"]}
    assert muon_owned == {id(model.block[0].weight), id(model.block[2].weight)}
    assert {id(model.embed.weight), id(model.out.weight)} <= {id(p) for p in opt.param_groups[1]["params"]}
    ids = torch.randint(0, 50, (32,), generator=torch.Generator().manual_seed(1))
    for m, o in ((model, opt), (twin, by_hand)):
        for _ in range(3):
            o.zero_grad()
            nn.functional.cross_entropy(m(ids), ids).backward()
            o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert set(opt.state[model.embed.weight]) == {"step", "exp_avg", "exp_avg_sq"}  # AdamW's state
    assert set(opt.state[model.out.weight]) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(opt.state[model.block[0].weight]) == {"step", "momentum_buffer"}
