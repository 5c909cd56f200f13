"""Number mode and tensor mode of every optimizer's coefficients (engine/scalars.py): the same numbers, and no
host read in tensor mode.

For every registered optimizer, under the contract's hyperparameters and the options that change its
coefficients: ``_advance`` then ``_coefficients`` at steps 1..300, in number mode (an int step, one parameter at a
time) and in tensor mode (one float64 step per parameter, the parameters at different steps), on copies of the
same state; each tensor entry i must be the number-mode value of parameter i at its step, to 1e-12 relative. The
same two calls traced by ``torch.compile(fullgraph=True)`` inside ``tensor_mode()`` prove that tensor mode reads
nothing on the host: a Python branch on a step-derived value breaks the graph, which fullgraph turns into an
error, and ``.item()`` or ``float()`` of a tensor, which dynamo (torch 2.13) traces into the graph as an ``item``
node rather than breaking it, is looked for in the traced graphs. A newly registered optimizer is covered by the
parametrization.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch._dynamo.testing import EagerAndRecordGraphs

import stochopt
from stochopt.engine.scalars import in_tensor_mode, tensor_mode
from tests.test_contract import make

NAMES = stochopt.list_optimizers()
SHAPES = [(4, 3), (5,), (2, 3, 2)]
# past every switch in the contract's hyperparameters: warm-ups of 5 and 20 steps, RAdam's rectification in its
# first steps (300 before: 3x the time for the same switches)
STEPS = 100
# Options that change the coefficients, beside the contract's hyperparameters (tests/test_contract.py).
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "sgd": [dict(momentum=0.0, dampening=0.0), dict(nesterov=True, dampening=0.0)],  # the first step differs
    "adagrad": [dict(lr_decay=0.0), dict(lr_decay=0.5)],
    "rmsprop": [dict(momentum=0.0, centered=False)],
    "adam": [dict(amsgrad=True, betas=(0.8, 0.99))],
    "qhadam": [dict(nus=(1.0, 1.0))],
    "nadam": [dict(momentum_decay=0.0), dict(momentum_decay=4e-3, decoupled_weight_decay=True)],
    # rectified from step 6 (0.999), 3 (0.99), 2 (0.9); never (0.5: rho_inf = 3, and 0.0: the radicand's sign)
    "radam": [dict(betas=(0.9, 0.99)), dict(betas=(0.9, 0.9)), dict(betas=(0.9, 0.5)), dict(betas=(0.9, 0.0))],
    "adabound": [dict(gamma=math.inf), dict(final_lr=0.0), dict(amsbound=True, gamma=1e-3)],
    "lamb": [dict(max_trust_ratio=None, trust_ratio=False)],
    "adafactor": [dict(beta1=0.9, eps=(1e-30, 1e-3), beta2_decay=-0.5), dict(lr=None, beta1=0.0)],
    "shampoo": [dict(betas=(0.0, 1.0), grafting="adagrad"), dict(grafting="none")],
    "muon": [dict(adamw_betas=(0.8, 0.9))],
}


def _case_id(name: str, extra: dict[str, Any]) -> str:
    return "-".join([name, *(f"{k}={v}" for k, v in extra.items())]).replace(" ", "")


CASES = [
    pytest.param(name, extra, id=_case_id(name, extra)) for name in NAMES for extra in [{}, *VARIANTS.get(name, [])]
]
LR_KINDS = ["lr_float", "lr_tensor"]


def build(name: str, extra: dict[str, Any], lr_kind: str) -> tuple[torch.optim.Optimizer, dict, list[dict]]:
    """The optimizer after one real step on small float64 params, its first group and the params' states.

    Scalar state other than ``step`` (NAdam's running product) is scaled per parameter, so that each parameter's
    own value must be read."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in SHAPES]
    opt = make(name, params, **extra)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
    opt.step()
    group = opt.param_groups[0]
    if lr_kind == "lr_tensor":
        group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float64)
    states = [opt.state[p] for p in group["params"] if p in opt.state]
    assert len(states) == len(SHAPES)
    for i, state in enumerate(states):
        for key, value in state.items():
            if key != "step" and value.dim() == 0 and value.is_floating_point():
                value.mul_(1.0 - 0.05 * i)
    return opt, group, states


def copied(group: dict, states: list[dict]) -> tuple[dict, list[dict]]:
    """What ``_advance`` may change (group entries such as AdaBound's eta_0, scalar state), copied."""
    return {k: v if k == "params" else copy.deepcopy(v) for k, v in group.items()}, copy.deepcopy(states)


def number_mode(opt: Any, group: dict, states: list[dict], steps: list[int]) -> list[dict[str, Any]]:
    """Parameter i alone at ``steps[i]``, as the engine buckets parameters by step in number mode."""
    out = []
    for step, state in zip(steps, states):
        g, (s,) = copied(group, [state])
        opt._advance(g, step, [s])
        out.append(opt._coefficients(g, step, [s]))
    return out


def tensor_steps(steps: list[int]) -> torch.Tensor:
    return torch.tensor(steps, dtype=torch.float64)


def tensor_mode_coefficients(opt: Any, group: dict, states: list[dict], steps: torch.Tensor) -> dict[str, Any]:
    g, s = copied(group, states)
    with tensor_mode():
        opt._advance(g, steps, s)
        return opt._coefficients(g, steps, s)


def assert_entries_agree(numbers: list[dict[str, Any]], tensors: dict[str, Any], where: str) -> None:
    """Entry by entry: tensor entry i (broadcast to the n parameters) is number-mode entry i."""
    n = len(numbers)
    for number in numbers:
        assert number.keys() == tensors.keys(), where
    for key, value in tensors.items():
        for i, number in enumerate(numbers):
            expected = number[key]
            at = f"{where}, {key!r}, param {i}"
            assert not isinstance(expected, torch.Tensor), f"{at}: number mode gives Python values"
            if isinstance(expected, bool) or not isinstance(expected, (int, float)):  # a switch, a tuple...
                assert value == expected, at
                continue
            if isinstance(value, torch.Tensor):
                assert value.dtype == torch.float64, f"{at}: {value.dtype}"
                assert torch.broadcast_shapes(value.shape, (n,)) == (n,), f"{at}: shape {tuple(value.shape)}"
                got = torch.broadcast_to(value, (n,))[i].item()
            else:
                assert isinstance(value, (int, float)), f"{at}: {type(value).__name__}"
                got = value
            same = math.isclose(got, expected, rel_tol=1e-12, abs_tol=0.0) or (math.isnan(got) and math.isnan(expected))
            assert same, f"{at}: tensor mode {got!r}, number mode {expected!r}"
            assert math.isfinite(got) or not math.isfinite(expected), at


#: graph nodes that read a tensor's value on the host (``float(t)`` and ``int(t)`` are traced as ``item``)
HOST_READ_METHODS = {"item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"}
HOST_READ_FUNCTIONS = {torch.ops.aten._local_scalar_dense.default, torch.Tensor.item, torch.Tensor.tolist}


def host_reads(graphs: list[torch.fx.GraphModule]) -> list[str]:
    return [
        node.format_node()
        for gm in graphs
        for node in gm.graph.nodes
        if (node.op == "call_method" and node.target in HOST_READ_METHODS)
        or (node.op == "call_function" and node.target in HOST_READ_FUNCTIONS)
    ]


def test_host_reads_are_found_in_a_traced_graph() -> None:
    """The proof's own check: ``.item()`` and ``float()`` traced without a graph break are found."""
    state = {"mu_product": torch.tensor(0.5)}
    cases = [
        (lambda t: t * state["mu_product"].item(), True),  # NAdam's number-mode read of its running product
        (lambda t: t * float(t.sum()), True),
        (lambda t: t * state["mu_product"], False),
    ]
    for fn, reads in cases:
        torch._dynamo.reset()
        backend = EagerAndRecordGraphs()
        torch.compile(fn, fullgraph=True, backend=backend)(torch.ones(3, dtype=torch.float64))
        assert len(backend.graphs) == 1
        assert bool(host_reads(backend.graphs)) == reads
    torch._dynamo.reset()


def test_variants_name_registered_optimizers() -> None:
    assert set(VARIANTS) <= set(NAMES)


@pytest.mark.parametrize("lr_kind", LR_KINDS)
@pytest.mark.parametrize("name,extra", CASES)
def test_tensor_mode_matches_number_mode(name: str, extra: dict, lr_kind: str) -> None:
    opt, group, states = build(name, extra, lr_kind)
    offsets = list(range(len(states)))  # the params at different steps: k, k+1, k+2
    for k in range(1, STEPS + 1):
        steps = [k + i for i in offsets]
        numbers = number_mode(opt, group, states, steps)
        tensors = tensor_mode_coefficients(opt, group, states, tensor_steps(steps))
        assert_entries_agree(numbers, tensors, f"{name} {extra} {lr_kind} steps {steps}")
    # all params at the same step as well
    for k in (1, 2, 5, 6, 7, 100):
        steps = [k] * len(states)
        numbers = number_mode(opt, group, states, steps)
        assert_entries_agree(numbers, tensor_mode_coefficients(opt, group, states, tensor_steps(steps)), f"{k}")


@pytest.mark.parametrize("lr_kind", LR_KINDS)
@pytest.mark.parametrize("name,extra", CASES)
def test_tensor_mode_reads_nothing_on_the_host(name: str, extra: dict, lr_kind: str) -> None:
    """``_advance`` and ``_coefficients`` in tensor mode trace into one graph (fullgraph: no graph break, so no
    branch on a step-derived value) holding no host read (``.item()``, ``float()`` of a tensor), and the traced
    graph computes what eager tensor mode computes."""
    opt, group, states = build(name, extra, lr_kind)
    g, s = copied(group, states)

    def advance_and_coefficients(steps: torch.Tensor) -> dict[str, Any]:
        assert in_tensor_mode()
        opt._advance(g, steps, s)
        return opt._coefficients(g, steps, s)

    torch._dynamo.reset()
    backend = EagerAndRecordGraphs()
    compiled = torch.compile(advance_and_coefficients, fullgraph=True, backend=backend)
    eager_group, eager_states = copied(group, states)
    for k in (1, 4, 250):
        steps = tensor_steps([k + i for i in range(len(states))])
        with tensor_mode():
            got = compiled(steps)
            opt._advance(eager_group, steps, eager_states)
            expected = opt._coefficients(eager_group, steps, eager_states)
        assert got.keys() == expected.keys()
        for key in expected:
            a, b = got[key], expected[key]
            if isinstance(b, torch.Tensor):
                assert isinstance(a, torch.Tensor), key
                torch.testing.assert_close(a, b, rtol=1e-12, atol=0.0, msg=key)
            else:
                assert a == b or (a != a and b != b), key
    # one graph, or two where _advance sets a group entry once (none where every coefficient is a Python float)
    assert len(backend.graphs) <= 2
    assert not host_reads(backend.graphs), host_reads(backend.graphs)
    for a, b in zip(s, eager_states):  # the scalar state moved the same way
        for key in b:
            assert torch.equal(a[key], b[key]), key
    torch._dynamo.reset()


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("extra", [{}, *VARIANTS["nadam"]], ids=lambda e: _case_id("nadam", e))
def test_nadam_mu_product_advances_the_same_in_both_modes(extra: dict, state_dtype: torch.dtype) -> None:
    """300 steps of ``_advance``: each parameter's running product, at its own step, is bit for bit the one
    number mode gives (the product taken in the state's dtype in both modes)."""
    opt, group, states = build("nadam", extra, "lr_float")
    for s in states:
        s["mu_product"] = s["mu_product"].to(state_dtype)
    by_number, by_tensor = copy.deepcopy(states), copy.deepcopy(states)
    for k in range(1, STEPS + 1):
        steps = [k + i for i in range(len(states))]
        for step, s in zip(steps, by_number):
            opt._advance(group, step, [s])
        with tensor_mode():
            opt._advance(group, tensor_steps(steps), by_tensor)
        for a, b in zip(by_number, by_tensor):
            assert a["mu_product"].dtype == b["mu_product"].dtype == state_dtype
            assert a["mu_product"].shape == b["mu_product"].shape == ()
            assert torch.equal(a["mu_product"], b["mu_product"]), (k, a["mu_product"].item(), b["mu_product"].item())
        if k == 10:  # (the products underflow to 0 later, as in torch.optim.NAdam)
            products = [s["mu_product"].item() for s in by_tensor]
            assert len(set(products)) == len(products) and min(products) > 0  # each parameter's own product


@pytest.mark.parametrize("beta2", [0.999, 0.99, 0.9])
def test_radam_rectification_switches_per_parameter_without_nan(beta2: float) -> None:
    """Steps 1..10 in one tensor: the SGD branch before rho_t > 5, the rectified one after, each parameter on its
    own side of the threshold, and no NaN from the branch not taken."""
    params = [torch.zeros(2, dtype=torch.float64, requires_grad=True) for _ in range(10)]
    opt = stochopt.RAdam(params, lr=0.01, betas=(0.9, beta2))
    group = opt.param_groups[0]
    with tensor_mode():
        c = opt._coefficients(group, tensor_steps(list(range(1, 11))), [])
    expected = [opt._coefficients(group, k, []) for k in range(1, 11)]
    for key in ("adaptive_weight", "sgd_weight", "eps"):
        assert torch.isfinite(c[key]).all(), key
        assert c[key].tolist() == pytest.approx([e[key] for e in expected], rel=1e-12, abs=0.0), key
    assert 0.0 < c["sgd_weight"].sum() < 10  # the threshold is crossed within the 10 steps


def test_adabound_takes_eta_0_from_a_tensor_lr_in_tensor_mode() -> None:
    """Built with lr=0 (a warmup from 0), AdaBound takes its first positive lr as eta_0; with a tensor lr in
    tensor mode it does so on the device (eta_0 a tensor, updated in place), as number mode does on the host."""
    params = [torch.zeros(3, dtype=torch.float64, requires_grad=True)]
    opt = stochopt.AdaBound(params, lr=torch.tensor(0.0, dtype=torch.float64), final_lr=0.1)
    group = opt.param_groups[0]
    assert group["base_lr"] == 0.0
    number_group = {**group}
    steps = torch.tensor([1.0], dtype=torch.float64)
    for k, lr in enumerate([0.0, 0.0, 0.01, 0.02, 0.005], start=1):
        group["lr"].fill_(lr)
        number_group["lr"] = lr
        opt._advance(number_group, k, [])
        with tensor_mode():
            opt._advance(group, steps * k, [])
            c = opt._coefficients(group, steps * k, [])
        assert isinstance(group["base_lr"], torch.Tensor)
        assert group["base_lr"].item() == number_group["base_lr"]
        assert_entries_agree([opt._coefficients(number_group, k, [])], c, f"lr {lr}")
    assert number_group["base_lr"] == 0.01
    # back in number mode, the tensor eta_0 is read as a float
    assert opt._coefficients(group, 6, [])["upper"] == opt._coefficients(number_group, 6, [])["upper"]
