"""Muon against torch.optim.Muon, its AdamW part against AdamW, the ownership rule and the group helper."""

from __future__ import annotations

import warnings

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


def ns_reference(g: torch.Tensor, steps: int = 5, coefficients=(3.4445, -4.7750, 2.0315), eps: float = 1e-7):
    """Jordan et al.'s quintic Newton-Schulz in float64, from the equations: X_0 = G / max(||G||_F, eps) (G^T if
    G is tall), X_{k+1} = a X_k + b A_k X_k + c A_k^2 X_k with A_k = X_k X_k^T."""
    a, b, c = coefficients
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / max(torch.linalg.vector_norm(x).item(), eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + b * (gram @ x) + c * (gram @ (gram @ x))
    return x.T if tall else x


# tall (transposed), wide, square, a row and a column, and a matrix whose norm (~2e-8) is below eps = 1e-7
NS_INPUTS = [((24, 16), 1.0), ((16, 40), 1.0), ((9, 9), 1e-3), ((1, 8), 1.0), ((8, 1), 1.0), ((24, 16), 1e-9)]


def ns_inputs(dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype) for shape, scale in NS_INPUTS]


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


# Tolerances of the low-precision iterations against float64, as relative Frobenius errors. bfloat16 (eps = 2^-7):
# the input and X after each of the 5 steps are rounded to bfloat16, a relative error of up to eps/2 each (the
# CPU and GPU matmuls accumulate in float32, which adds nothing at this scale); 7 such roundings, partly amplified
# (the slope a = 3.44 of the iteration at 0 stretches the errors in the small singular directions), measure
# 0.9e-2 to 1.7e-2 here, 1.2 to 2.2 eps. float32 (eps = 1.2e-7): the same roundings plus each matmul's float32
# accumulation; measured <= 1.4e-6 (12 eps; 300 x 256 included). The bounds, 4 eps and 64 eps, leave about 2x
# and 5x over those and stay below what a 1% change of one coefficient makes (5e-2 to 1.3e-1).
NS_TOLERANCE = {torch.bfloat16: 4 * torch.finfo(torch.bfloat16).eps, torch.float32: 64 * torch.finfo(torch.float32).eps}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bfloat16", "float32"])
def test_newton_schulz_matches_a_float64_loop_within_its_rounding(dtype: torch.dtype) -> None:
    """Both dtypes default_ns_dtype can choose, from float32 inputs (a float32 model's momentum)."""
    for g in ns_inputs(torch.float32):
        x = newton_schulz(g, dtype=dtype)
        assert x.dtype == dtype and x.shape == g.shape
        assert relative_error(x, ns_reference(g)) < NS_TOLERANCE[dtype]


def test_newton_schulz_default_dtype_is_that_iteration() -> None:
    """ns_dtype=None is the iteration in default_ns_dtype (bfloat16 or float32 by the machine), bit for bit, and
    within that dtype's tolerance of the float64 loop."""
    dtype = default_ns_dtype(torch.device("cpu"))
    assert dtype in NS_TOLERANCE
    for g in ns_inputs(torch.float32):
        x = newton_schulz(g)
        assert torch.equal(x, newton_schulz(g, dtype=dtype))
        assert relative_error(x, ns_reference(g)) < NS_TOLERANCE[dtype]


@pytest.mark.parametrize(
    "options", [{}, dict(steps=3, coefficients=(3.0, -3.2, 1.2), eps=1e-5)], ids=["default", "other"]
)
def test_newton_schulz_in_float64_is_the_loop(options: dict) -> None:
    for g in ns_inputs(torch.float64):
        x = newton_schulz(g, dtype=torch.float64, **options)
        assert x.dtype == torch.float64
        torch.testing.assert_close(x, ns_reference(g, **options), rtol=1e-10, atol=1e-10)


def muon_reference(params: list[torch.Tensor], muon: list[bool], steps: int, hp: dict, lrs: list[float]) -> None:
    """Muon on the matrices (``muon[i]``) and AdamW on the rest, in float64, from the equations of muon.py's
    docstring: B = mu B + (1 - mu) g, the Nesterov direction (1 - mu) g + mu B, W <- (1 - lr wd) W - lr s O."""
    mu, wd, nesterov = hp["momentum"], hp["weight_decay"], hp["nesterov"]
    (b1, b2), adam_eps = hp["adamw_betas"], hp["adamw_eps"]
    ns = dict(steps=hp["ns_steps"], coefficients=hp["ns_coefficients"], eps=hp["eps"])
    states = [dict(b=torch.zeros_like(p), m=torch.zeros_like(p), v=torch.zeros_like(p)) for p in params]
    for t in range(1, steps + 1):
        set_grads(params, t - 1)
        with torch.no_grad():
            for p, owned, st, lr in zip(params, muon, states, lrs):
                g = p.grad
                p.mul_(1 - lr * wd)
                if owned:
                    rows, cols = p.shape[0], p[0].numel()
                    st["b"] = mu * st["b"] + (1 - mu) * g
                    u = (1 - mu) * g + mu * st["b"] if nesterov else st["b"]
                    if hp["adjust_lr_fn"] == "match_rms_adamw":
                        scale = 0.2 * max(rows, cols) ** 0.5
                    else:
                        scale = max(1.0, rows / cols) ** 0.5
                    p.sub_(lr * scale * ns_reference(u.reshape(rows, cols), **ns).reshape(p.shape))
                else:
                    st["m"] = b1 * st["m"] + (1 - b1) * g
                    st["v"] = b2 * st["v"] + (1 - b2) * g * g
                    m_hat, v_hat = st["m"] / (1 - b1**t), st["v"] / (1 - b2**t)
                    p.sub_(lr * m_hat / (v_hat.sqrt() + adam_eps))


MUON_CASES = {
    "nesterov-original": dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn=None),
    "heavy-ball-match-rms": dict(lr=0.01, weight_decay=0.01, momentum=0.9, nesterov=False,
                                 adjust_lr_fn="match_rms_adamw"),
    "coefficients-3-steps": dict(lr=0.02, weight_decay=0.05, momentum=0.8, nesterov=True, adjust_lr_fn="original",
                                 ns_coefficients=(3.0, -3.2, 1.2), ns_steps=3, eps=1e-5),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MUON_CASES))
def test_muon_step_matches_a_float64_loop(case: str, host_path: dict) -> None:
    """100 steps, every path: Muon's matrices (tall, wide, square, a conv kernel) with ns_dtype=float64, and the
    AdamW part (vectors by the default rule; a use_muon=False group with its own lr, holding a 300 x 256 matrix,
    which the fused path runs through its compiled kernel)."""
    defaults = dict(ns_coefficients=(3.4445, -4.7750, 2.0315), ns_steps=5, eps=1e-7)
    hp = {**defaults, "adamw_betas": (0.8, 0.99), "adamw_eps": 1e-6, **MUON_CASES[case]}
    shapes = [(24, 16), (16, 40), (9, 9), (6, 3, 2, 2), (7,), (1,), (300, 256), (11,)]
    params = make_params(shapes)
    ref_params = clone_params(params)
    opt = stochopt.Muon(
        [{"params": params[:6]}, {"params": params[6:], "use_muon": False, "lr": 3e-3}],
        ns_dtype=torch.float64, **hp, **host_path,
    )  # fmt: skip
    run(opt, params, 100)
    muon_reference(ref_params, [True] * 4 + [False] * 4, 100, hp, [hp["lr"]] * 6 + [3e-3] * 2)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10)


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


class HFStyleLM(nn.Module):
    """Names as a Hugging Face decoder has them: model.embed_tokens, model.layers.N, lm_head."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(20, 8)
        self.model.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.lm_head = nn.Linear(8, 20, bias=False)


def test_named_parameters_or_the_model_keep_embeddings_and_heads_out_of_muon() -> None:
    model = HFStyleLM()
    named = stochopt.Muon(model.named_parameters(), lr=0.02)
    owners = {name: g["use_muon"] for g in named.param_groups for name in g["param_names"]}
    layers = {
        f"model.layers.{i}.{kind}": None if kind == "weight" else False for i in range(2) for kind in ("weight", "bias")
    }
    assert owners == {**layers, "model.embed_tokens.weight": False, "lm_head.weight": False}  # biases: AdamW's
    from_module = stochopt.Muon(model, lr=0.02)
    muon = {id(p) for g in from_module.param_groups if g["use_muon"] for p in g["params"]}
    assert muon == {id(layer.weight) for layer in model.model.layers}
    grouped = stochopt.Muon([{"params": list(model.named_parameters()), "weight_decay": 0.0}], lr=0.02)
    assert [(g["use_muon"], g["weight_decay"]) for g in grouped.param_groups] == [(None, 0.0), (False, 0.0)]
    ids = torch.randint(0, 20, (16,), generator=torch.Generator().manual_seed(0))
    nn.functional.cross_entropy(model.lm_head(model.model.layers[1](model.model.embed_tokens(ids))), ids).backward()
    named.step()
    assert set(named.state[model.lm_head.weight]) == {"step", "exp_avg", "exp_avg_sq"}  # AdamW's
    assert set(named.state[model.model.layers[1].weight]) == {"step", "momentum_buffer"}  # Muon's
    assert not stochopt.optim.muon.adamw_by_name("encoder.layer.0.attention.output.dense.weight")


def test_adamw_groups_take_adamw_lr_not_muons() -> None:
    """create_optimizer("muon", model, lr=0.02) must not give the embedding and head lr 0.02: the groups that set no
    lr take adamw_lr (default 3e-4, or the shared lr under match_rms_adamw), which schedulers then scale."""
    model = HFStyleLM()
    lrs = lambda opt: [(g["use_muon"], g["lr"], g["weight_decay"]) for g in opt.param_groups]  # noqa: E731
    opt = stochopt.create_optimizer("muon", model, lr=0.02)
    assert lrs(opt) == [(True, 0.02, 0.1), (False, 3e-4, 0.1)]
    assert lrs(stochopt.Muon(model, lr=0.02, adamw_lr=1e-3, adamw_weight_decay=0.0)) == [
        (True, 0.02, 0.1), (False, 1e-3, 0.0)]  # fmt: skip
    assert lrs(stochopt.Muon(model.named_parameters(), lr=1e-3, adjust_lr_fn="match_rms_adamw")) == [
        (None, 1e-3, 0.1), (False, 1e-3, 0.1)]  # fmt: skip
    mine = stochopt.Muon([{"params": [model.lm_head.weight], "use_muon": False, "lr": 5e-3}], lr=0.02)
    assert lrs(mine) == [(False, 5e-3, 0.1)]  # the user's own lr stays
    mine.add_param_group({"params": [model.model.embed_tokens.weight], "use_muon": False})
    assert lrs(mine)[1] == (False, 3e-4, 0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 1.5e-4]
    del scheduler
    with pytest.raises(ValueError, match="adamw_lr"):
        stochopt.Muon(model, adamw_lr=-1.0)
    # and the lr is what AdamW runs with: the embedding follows torch.optim.AdamW at lr 3e-4 (1.5e-4 scheduled)
    embedding = model.model.embed_tokens.weight
    ref = embedding.detach().clone().requires_grad_()
    torch_adamw = torch.optim.AdamW([ref], lr=1.5e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ids = torch.randint(0, 20, (16,), generator=torch.Generator().manual_seed(0))
    for _ in range(100):
        opt.zero_grad()
        model.model.embed_tokens(ids).square().sum().backward()
        ref.grad = embedding.grad.clone()
        opt.step()
        torch_adamw.step()
    torch.testing.assert_close(embedding, ref, rtol=1e-6, atol=1e-7)


def test_bare_matrices_are_muons_with_a_warning() -> None:
    model = HFStyleLM()
    with pytest.warns(UserWarning, match="without names"):
        opt = stochopt.Muon(model.parameters(), lr=0.02)
    assert [g["use_muon"] for g in opt.param_groups] == [None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stochopt.Muon([torch.zeros(3, requires_grad=True)], lr=0.02)  # vectors only: nothing to judge
        stochopt.Muon([{"params": list(model.parameters()), "use_muon": True}], lr=0.02)  # the user decided
