"""Schedule-Free AdamW and SGD against the authors' ``schedulefree`` package (float64, 200 steps, every execution
path) and against a plain loop written here from the paper's equations; the train/eval switch, resume from a
state_dict saved in either mode, the batch-norm helper, and the refusals."""

from __future__ import annotations

import copy
import io

import pytest
import schedulefree
import torch
from torch import nn

import stochopt
from tests.conftest import assert_same, clone_params, make_params, run, set_grads

ADAMW_HP = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, warmup_steps=20)
SGD_HP = dict(lr=0.05, momentum=0.9, weight_decay=0.01, warmup_steps=20)
# (ours, the package's, hyperparameters); weight_lr_power at its default (2) and at 0.5, r at 0 and 1
CASES = [
    (stochopt.AdamWScheduleFree, schedulefree.AdamWScheduleFree, {**ADAMW_HP}),
    (stochopt.AdamWScheduleFree, schedulefree.AdamWScheduleFree, {**ADAMW_HP, "weight_lr_power": 0.5, "r": 1.0}),
    (stochopt.SGDScheduleFree, schedulefree.SGDScheduleFree, {**SGD_HP}),
    (stochopt.SGDScheduleFree, schedulefree.SGDScheduleFree, {**SGD_HP, "weight_lr_power": 0.5, "r": 1.0}),
]


class CachedGrads:
    """``set_grads`` (tests/conftest.py) with its noise drawn once per step and kept: g = p * scale_i + noise_t,
    the same tensors, for the many runs of one test (drawing the noise is most of an eager step's time here)."""

    def __init__(self) -> None:
        self.noise: dict[int, list[torch.Tensor]] = {}

    def __call__(self, params: list[torch.Tensor], t: int) -> None:
        if t not in self.noise:
            zeros = [torch.zeros(p.shape, dtype=torch.float64, requires_grad=True) for p in params]
            set_grads(zeros, t)
            self.noise[t] = [z.grad for z in zeros]
        for i, (p, noise) in enumerate(zip(params, self.noise[t])):
            p.grad = (p.detach().double() * (0.5 + 0.1 * i) + noise).to(p.dtype)


def test_cached_grads_are_set_grads() -> None:
    a, b = make_params(), make_params()
    set_grads(a, 7)
    CachedGrads()(b, 7)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(a, b))


def _pair(ours_cls, theirs_cls, hp, flags):
    params = make_params()
    reference = clone_params(params)
    ours, theirs = ours_cls(params, **hp, **flags), theirs_cls(reference, **hp)
    theirs.train()  # the package starts in eval mode; stochopt in train mode (before any step they agree)
    return params, ours, reference, theirs


def _steps(opts_and_params, start: int, steps: int, grads=set_grads) -> None:
    for t in range(start, start + steps):
        for opt, params in opts_and_params:
            grads(params, t)
            opt.step()


def test_equals_the_authors_package_on_every_path(path: dict) -> None:
    """Both optimizers, two weightings each: 100 steps, eval() and train() (the package's switch, bit for bit),
    100 more steps, eval(). The eager paths are the package's operations in its order (bit for bit); the compiled
    kernel (fused, capturable) fuses them (1e-12)."""
    compiled = "fused" in path or "capturable" in path
    tolerance = dict(rtol=1e-12, atol=1e-12) if compiled else dict(rtol=0, atol=0)
    grads = CachedGrads()
    for ours_cls, theirs_cls, hp in CASES:
        params, ours, reference, theirs = _pair(ours_cls, theirs_cls, hp, path)
        pairs = [(ours, params), (theirs, reference)]
        _steps(pairs, 0, 100, grads)
        assert_same(params, reference, **tolerance)
        ours.eval()
        theirs.eval()
        assert not ours.train_mode and not ours.param_groups[0]["train_mode"]
        assert_same(params, reference, **tolerance)
        ours.train()
        theirs.train()
        assert ours.train_mode
        _steps(pairs, 100, 100, grads)
        assert_same(params, reference, **tolerance)
        ours.eval()
        theirs.eval()
        assert_same(params, reference, **tolerance)
        group, their_group = ours.param_groups[0], theirs.param_groups[0]
        for key in ("k", "lr_max", "weight_sum", "scheduled_lr"):
            assert float(group[key]) == pytest.approx(their_group[key], rel=1e-15, abs=0), key


def paper_loop(params: list[torch.Tensor], steps: int, hp: dict, adam: bool, grads=set_grads) -> list[torch.Tensor]:
    """The paper's y/z/x sequences with x and z stored (Defazio et al., 2024, eq. 1 and Algorithm 1; the
    warmup and the weights c_t = w_t / sum w_i, w_t = t^r lr_max^p, of its section on warmup); returns x."""
    beta = hp["betas"][0] if adam else hp["momentum"]
    lr, wd, warmup = hp["lr"], hp["weight_decay"], hp["warmup_steps"]
    r, power = hp.get("r", 0.0), hp.get("weight_lr_power", 2.0)
    with torch.no_grad():
        z = [p.detach().clone() for p in params]
        x = [p.detach().clone() for p in params]
        v = [torch.zeros_like(p) for p in params]
        lr_max, weight_sum = 0.0, 0.0
        for t in range(1, steps + 1):
            grads(params, t - 1)  # the gradient at y, which the parameters hold
            gamma = lr * min(1.0, t / warmup)
            lr_max = max(lr_max, gamma)
            weight = t**r * lr_max**power
            weight_sum += weight
            c = weight / weight_sum
            for i, y in enumerate(params):
                g = y.grad
                if adam:
                    beta2 = hp["betas"][1]
                    v[i] = beta2 * v[i] + (1 - beta2) * g * g
                    g = g / (torch.sqrt(v[i] / (1 - beta2**t)) + hp["eps"])
                u = g + wd * y  # weight decay at y
                z[i] = z[i] - gamma * u
                x[i] = (1 - c) * x[i] + c * z[i]
                y.copy_((1 - beta) * z[i] + beta * x[i])
    return x


@pytest.mark.parametrize("case", [0, 3], ids=["adamw", "sgd-power0.5-r1"])
def test_equals_the_papers_equations(case: int) -> None:
    ours_cls, _, hp = CASES[case]
    params = make_params()
    reference = clone_params(params)
    opt = ours_cls(params, **hp)
    grads = CachedGrads()
    _steps([(opt, params)], 0, 200, grads)
    x = paper_loop(reference, 200, hp, adam=ours_cls is stochopt.AdamWScheduleFree, grads=grads)
    assert_same(params, reference)  # y
    opt.eval()
    assert_same(params, x)  # x, recovered from y and z


def test_parameters_whose_gradients_start_later_follow_the_package() -> None:
    """k, lr_max and weight_sum are per group, as in the package: a parameter whose first gradient comes at step
    10 starts its z there and takes the group's weights from then on."""
    for ours_cls, theirs_cls, hp in CASES[::2]:
        params, ours, reference, theirs = _pair(ours_cls, theirs_cls, hp, {})
        for t in range(30):
            for opt, ps in ((ours, params), (theirs, reference)):
                set_grads(ps, t)
                if t < 10:
                    ps[3].grad = None
                opt.step()
        assert "z" in ours.state[params[3]]
        ours.eval()
        theirs.eval()
        assert_same(params, reference, rtol=0, atol=0)


def test_eval_mode_refuses_to_step_and_new_groups_take_the_mode() -> None:
    params = make_params()
    opt = stochopt.SGDScheduleFree(params[:3], lr=0.1)
    run(opt, params[:3], 3)
    opt.eval()
    before = [p.detach().clone() for p in params[:3]]
    opt.eval()  # a second eval() changes nothing
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    set_grads(params[:3], 3)
    with pytest.raises(RuntimeError, match=r"eval mode.*optimizer\.train\(\)"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and opt.param_groups[0]["k"] == 3
    opt.add_param_group({"params": params[3:]})
    assert opt.param_groups[1]["train_mode"] is False
    opt.train()
    assert opt.train_mode
    run(opt, params, 2, start=4)  # the new group's params have no z until their first step: train() skips them
    assert all("z" in opt.state[p] for p in params)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("flags", [{}, {"capturable": True}], ids=["default", "capturable"])
def test_state_dict_resume_is_bit_exact_in_either_mode(mode: str, flags: dict) -> None:
    """Saved in train mode (parameters y) or in eval mode (parameters x, the package's advice for checkpoints),
    with the model's parameters as they then are: a fresh optimizer that loads both resumes bit for bit."""
    for ours_cls, hp in ((stochopt.AdamWScheduleFree, ADAMW_HP), (stochopt.SGDScheduleFree, SGD_HP)):
        params = make_params()
        opt = ours_cls(params, **hp, **flags)
        run(opt, params, 10)
        if mode == "eval":
            opt.eval()
        buffer = io.BytesIO()
        torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer)
        resumed_params = [p.clone().requires_grad_() for p in saved["params"]]
        resumed = ours_cls(resumed_params, **hp, **flags)
        resumed.load_state_dict(saved["opt"])
        assert resumed.train_mode == (mode == "train")
        for o, ps in ((opt, params), (resumed, resumed_params)):
            o.train()
            run(o, ps, 10, start=10)
            o.eval()
        for p, q in zip(params, resumed_params):
            assert torch.equal(p, q)


def test_the_traced_step_reads_nothing_on_the_host() -> None:
    """Tensor mode (here: the step traced by torch.compile, one graph, no break) moves k, lr_max and weight_sum
    on the device: no ``.item()`` in the graph, and the same numbers as the eager step."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    from tests.engine.test_scalars import host_reads

    params = [torch.randn(6, 5, dtype=torch.float64, requires_grad=True)]
    reference = clone_params(params)
    hp = dict(lr=torch.tensor(0.01, dtype=torch.float64), warmup_steps=3, weight_decay=0.1)
    opt, ref = stochopt.AdamWScheduleFree(params, **hp), stochopt.AdamWScheduleFree(reference, **hp)
    torch._dynamo.reset()
    backend = EagerAndRecordGraphs()
    step = torch.compile(opt.step, fullgraph=True, backend=backend)
    for t in range(5):
        set_grads(params, t)
        set_grads(reference, t)
        step() if t else opt.step()  # the first step creates the state
        ref.step()
    torch._dynamo.reset()
    assert backend.graphs and not host_reads(backend.graphs), host_reads(backend.graphs)
    assert_same(params, reference)
    for key in ("k", "lr_max", "weight_sum"):
        assert isinstance(opt.param_groups[0][key], torch.Tensor)
        assert float(opt.param_groups[0][key]) == pytest.approx(ref.param_groups[0][key], rel=1e-15), key


def test_grad_scaler_found_inf_moves_nothing() -> None:
    """A step GradScaler skips (found_inf) leaves the parameters, z and the group's k, lr_max and weight_sum."""
    params = make_params()
    reference = clone_params(params)
    opt = stochopt.AdamWScheduleFree(params, **ADAMW_HP, foreach=True)
    ref = stochopt.AdamWScheduleFree(reference, **ADAMW_HP, foreach=True)
    for t in range(6):
        set_grads(params, t)
        set_grads(reference, t)
        opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0 if t == 3 else 0.0)
        opt.step()
        if t != 3:
            ref.step()
    assert_same(params, reference, rtol=0, atol=0)
    assert opt.param_groups[0]["k"] == ref.param_groups[0]["k"] == 5


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_update_bn_at_x_changes_the_statistics_only() -> None:
    torch.manual_seed(0)
    model = _Net().double()
    opt = stochopt.AdamWScheduleFree(model.parameters(), lr=0.05, warmup_steps=2)
    data = [torch.randn(16, 4, dtype=torch.float64) for _ in range(4)]
    for x in data * 3:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    bn = model.body[1]
    y = [p.detach().clone() for p in model.parameters()]
    stats = {k: v.clone() for k, v in bn.state_dict().items()}

    # the expected statistics: update_bn on a copy whose parameters are x
    expected = copy.deepcopy(model)
    with torch.no_grad():
        for p, q in zip(model.parameters(), expected.parameters()):
            q.copy_(p.lerp(opt.state[p]["z"], 1 - 1 / 0.9))  # x, as eval() computes it
    torch.optim.swa_utils.update_bn(data, expected)

    model.eval()
    stochopt.update_bn_at_x(data, model, opt)
    assert opt.train_mode and not model.training
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), y)), "parameters restored to y bit for bit"
    assert not torch.equal(bn.running_mean, stats["running_mean"])
    assert not torch.equal(bn.running_var, stats["running_var"])
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(bn, key), getattr(expected.body[1], key)), key

    opt.eval()  # in eval mode the parameters stay x, and the mode stays eval
    x = [p.detach().clone() for p in model.parameters()]
    stochopt.update_bn_at_x(data, model, opt)
    assert not opt.train_mode
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), x))


@pytest.mark.parametrize(
    "cls, bad, pattern",
    [
        (stochopt.AdamWScheduleFree, dict(lr=-1.0), r"lr.*-1\.0"),
        (stochopt.AdamWScheduleFree, dict(betas=(0.0, 0.999)), r"betas\[0\].*beta1"),
        (stochopt.AdamWScheduleFree, dict(betas=(0.9, 1.0)), r"betas\[1\]"),
        (stochopt.AdamWScheduleFree, dict(eps=0.0), r"eps must be a finite number > 0"),
        (stochopt.AdamWScheduleFree, dict(weight_decay=-0.1), r"weight_decay"),
        (stochopt.AdamWScheduleFree, dict(warmup_steps=-1), r"warmup_steps must be an int >= 0"),
        (stochopt.AdamWScheduleFree, dict(r=float("nan")), r"^r must be a number"),
        (stochopt.AdamWScheduleFree, dict(weight_lr_power=-2.0), r"weight_lr_power"),
        (stochopt.SGDScheduleFree, dict(momentum=0.0), r"momentum must be a finite number > 0"),
        (stochopt.SGDScheduleFree, dict(momentum=1.0), r"momentum must be in \[0, 1\)"),
        (stochopt.SGDScheduleFree, dict(lr=float("nan")), r"lr must be a number, not NaN"),
        (stochopt.SGDScheduleFree, dict(r=-0.5), r"^r must be a finite number >= 0"),
    ],
)
def test_bad_values_are_rejected_by_name(cls, bad: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        cls(make_params(), **bad)


def test_warmup_steps_must_be_an_int() -> None:
    with pytest.raises(TypeError, match="warmup_steps must be an int"):
        stochopt.SGDScheduleFree(make_params(), warmup_steps=2.5)
