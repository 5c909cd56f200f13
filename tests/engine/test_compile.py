"""The engine under torch.compile: one launch per bucket of tensors, a user's compiled training step that
recompiles nothing after warm-up and equals eager, no graph break inside the update, GradScaler's found_inf and
scale read on the device. Graphs, recompiles and launches are counted, never timed."""

from __future__ import annotations

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import stochopt
from stochopt.engine import fused
from stochopt.engine import optimizer as engine
from tests.conftest import SHIPPED_BUCKET_WIDTH, set_grads
from tests.test_contract import CONTRACT_HP, NAMES, make

CAPTURABLE = [n for n in NAMES if stochopt.optimizer_entry(n).cls._capturable]


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()


def _train(name: str, backend: str | None, steps: int = 50, **extra) -> tuple[list[torch.Tensor], list[int]]:
    """A user's training step, compiled whole (forward, backward, opt.step) when ``backend`` is given, with a
    tensor lr and a LambdaLR scheduler stepping every iteration; returns the weights and the number of frames
    dynamo had compiled after each step."""
    model = _model()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=gen, dtype=torch.float64), torch.randn(32, 1, generator=gen).double()
    lr = CONTRACT_HP.get(name, {}).get("lr", 0.01)
    opt = make(name, list(model.parameters()), lr=torch.tensor(lr, dtype=torch.float64), **extra)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1.0 + 0.05 * t))

    def train_step() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    counter = CompileCounterWithBackend(backend) if backend else None
    step = torch.compile(train_step, backend=counter) if counter else train_step
    frames = []
    for _ in range(steps):
        step()
        sched.step()
        frames.append(counter.frame_count if counter else 0)
    return [p.detach().clone() for p in model.parameters()], frames


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch):
    monkeypatch.setattr(fused, "BUCKET_WIDTH", SHIPPED_BUCKET_WIDTH)
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", CAPTURABLE)
def test_a_compiled_training_step_recompiles_nothing_after_two_steps_and_equals_eager(name: str) -> None:
    # aot_eager: dynamo's graphs and AOTAutograd's functionalization (where in-place updates of parameters
    # inside a compiled step fail when they fail), without inductor's code generation (tested below)
    eager, _ = _train(name, None)
    compiled, frames = _train(name, "aot_eager")
    assert frames[-1] == frames[1], f"frames compiled after each step: {frames}"
    for p, q in zip(compiled, eager):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert not [r for r in counters["graph_break"] if "item" in r.lower() or "data-dependent" in r.lower()]


@pytest.mark.parametrize("name,extra", [("adamw", {}), ("nadam", {}), ("lion", {}), ("adamw", {"fused": True})])
def test_a_compiled_training_step_with_inductor(name: str, extra: dict) -> None:
    eager, _ = _train(name, None, steps=12, **extra)
    compiled, frames = _train(name, "inductor", steps=12, **extra)
    assert frames[-1] == frames[1], f"frames compiled after each step: {frames}"
    for p, q in zip(compiled, eager):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in CAPTURABLE])
def test_matrix_optimizers_in_a_compiled_step_equal_eager(name: str, monkeypatch) -> None:
    """Their step loops decide on the host (Shampoo's root interval, Muon's and AdaFisher's per-matrix work):
    dynamo breaks the graph there, as it does in torch.optim's host-side code, and the result is eager's.
    Muon's Newton-Schulz runs in float64 here (its bfloat16 default rounds differently once traced); Shampoo's
    inverse roots (eigh of factors regularized by eps = 1e-12) amplify the last bits of traced matmuls (measured:
    up to 2e-6 relative, on one element of 128)."""
    import stochopt.optim.muon as muon

    monkeypatch.setattr(muon, "default_ns_dtype", lambda device: torch.float64)
    eager, _ = _train(name, None, steps=12)
    compiled, _ = _train(name, "aot_eager", steps=12)
    for p, q in zip(compiled, eager):
        torch.testing.assert_close(p, q, rtol=1e-5 if name == "shampoo" else 1e-12, atol=1e-12)


@pytest.mark.parametrize("name", CAPTURABLE)
def test_the_step_compiled_alone_has_no_graph_break(name: str) -> None:
    """``torch._dynamo.explain(opt.step)``: one graph, no break (a host read such as ``.item()`` or a branch on a
    tensor's value would be one), once the state exists (its creation is the first step's work)."""
    params = [torch.randn(30, 20, dtype=torch.float64, requires_grad=True), torch.randn(5, requires_grad=True)]
    params[1] = params[1].detach().double().requires_grad_()
    opt = make(name, params, lr=torch.tensor(1e-3, dtype=torch.float64))
    set_grads(params, 0)
    opt.step()
    set_grads(params, 1)
    explained = torch._dynamo.explain(opt.step)()
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_one_launch_per_bucket_and_one_graph_for_any_number_of_tensors(monkeypatch) -> None:
    launches = []
    real = fused.fused_kernel

    def counting(*args, **kwargs):
        kernel = real(*args, **kwargs)

        def launch(ps, *rest):
            launches.append(len(ps))
            kernel(ps, *rest)

        return launch

    monkeypatch.setattr(fused, "fused_kernel", counting)
    shapes = [(40, 30), (17,), (5, 3, 2), (64,)] * 5  # 20 tensors, several of one size
    params = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    opt = stochopt.NAdam(params, lr=1e-3, fused=True)
    set_grads(params, 0)
    opt.step()
    # two buckets (matrices and vectors: gradient centralization, an engine option, applies to matrices only),
    # of 10 tensors each: two launches each, the last padded
    assert launches == [SHIPPED_BUCKET_WIDTH] * 2 * math.ceil(10 / SHIPPED_BUCKET_WIDTH)
    graphs = counters["stats"]["unique_graphs"]
    more = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in [(3, 7), (101,), (9, 9)]]
    opt.add_param_group({"params": more})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + t))
    for t in range(1, 6):
        set_grads(params + more, t)
        opt.step()
        sched.step()
    assert counters["stats"]["unique_graphs"] == graphs  # new tensors, new sizes, new lr: no new graph


@pytest.mark.parametrize("name", ["nadam", "radam", "adagrad"])
def test_one_launch_holds_tensors_at_different_steps(name: str) -> None:
    """capturable: parameters of one group whose gradients start later (fewer steps) share launches with the
    others, each with its own coefficient row; equal to the loop (where they are separate buckets)."""
    shapes = [(6, 5), (9,), (4, 4), (3, 7), (8,)]
    params = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    reference = [p.detach().clone().requires_grad_() for p in params]
    opt, ref = make(name, params, capturable=True), make(name, reference, foreach=False)
    for t in range(30):
        for ps in (params, reference):
            set_grads(ps, t)
            if t < 10:  # the last two have no gradient yet: no state, no step
                ps[3].grad = ps[4].grad = None
        opt.step()
        ref.step()
    for p, q in zip(params, reference):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    if "step" in opt.state[params[0]]:
        assert float(opt.state[params[0]]["step"]) == 30 and float(opt.state[params[3]]["step"]) == 20


@pytest.mark.parametrize("name", ["adamw", "nadam", "sgd"])
@pytest.mark.parametrize("path", [{"fused": True}, {"capturable": True}, {"foreach": True}])
def test_grad_scaler_found_inf_skips_and_the_scale_is_divided_out(name: str, path: dict, monkeypatch) -> None:
    """GradScaler hands its scale and found_inf to the step (``_step_supports_amp_scaling``): the compiled kernel
    and torch's native one use them on the device, the eager paths read found_inf once. A step with found_inf
    changes nothing, step counters included; one without equals an unscaled step."""
    monkeypatch.setattr(engine.EngineOptimizer, "use_native_fused", name == "sgd" and "fused" in path)
    params = [torch.randn(40, 30, dtype=torch.float64, requires_grad=True), torch.randn(7).double().requires_grad_()]
    reference = [p.detach().clone().requires_grad_() for p in params]
    opt, ref = make(name, params, **path), make(name, reference)
    for t in range(6):
        set_grads(params, t)
        set_grads(reference, t)
        scale = torch.tensor(2.0**t, dtype=torch.float32)
        for p in params:
            p.grad.mul_(scale.double())
        inf = t == 3
        opt.grad_scale, opt.found_inf = scale, torch.tensor(1.0 if inf else 0.0)
        before = [p.detach().clone() for p in params]
        opt.step()
        if inf:
            assert all(torch.equal(p, b) for p, b in zip(params, before))
        else:
            ref.step()
        del opt.grad_scale, opt.found_inf
    for p, q in zip(params, reference):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    if "step" in ref.state[reference[0]]:
        assert float(opt.state[params[0]]["step"]) == float(ref.state[reference[0]]["step"]) == 5


def test_grad_scaler_drives_the_step() -> None:
    """torch.amp.GradScaler on the CPU with a stochopt optimizer: the scaled loss trains as the unscaled one."""
    model, ref_model = _model(), _model()
    opt = stochopt.AdamW(model.parameters(), lr=1e-2, fused=True)
    ref = stochopt.AdamW(ref_model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    for _ in range(10):
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            if o is opt:
                scaler.scale(loss).backward()
                scaler.step(o)
                scaler.update()
            else:
                loss.backward()
                o.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_capturable_keeps_the_step_counters_on_the_parameters_device() -> None:
    params = [torch.randn(40, 30, requires_grad=True)]
    opt = stochopt.Adam(params, lr=1e-3, capturable=True)
    set_grads(params, 0)
    params[0].grad = params[0].grad.float()
    opt.step()
    assert opt.state[params[0]]["step"].device == params[0].device
    for bad, says in [({"foreach": True}, "foreach=True"), ({"nonfinite": "skip"}, "nonfinite='skip'")]:
        with pytest.raises(ValueError, match=says):
            stochopt.Adam(params, capturable=True, **bad)
    with pytest.raises(ValueError, match="Shampoo does not support capturable=True"):
        stochopt.Shampoo(params, capturable=True)


# the kernels as users compile them: the shipped bucket width, inductor's vectorized C++ (tests/conftest.py turns
# both down for the rest of the suite): an elementwise kernel and a row/column (unflattened) one
SHIPPED_KERNELS = """
import json, sys, torch
import stochopt
from stochopt.engine import fused
from torch._inductor import cpu_vec_isa
stochopt.engine.EngineOptimizer.use_native_fused = False
shapes = [(300, 256), (64, 48), (7, 5), (11,), (1,)]  # matrices and vectors: two graphs of the unflattened kernel
out = {"width": fused.BUCKET_WIDTH, "vectorized": bool(cpu_vec_isa.pick_vec_isa())}
for name in ("adamw", "adafactor"):
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    runs = []
    for flags in ({"foreach": False}, {"fused": True}):
        ps = [t.clone().requires_grad_() for t in start]
        opt = stochopt.create_optimizer(name, ps, lr=1e-2, **flags)
        for step in range(20):
            g = torch.Generator().manual_seed(step)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64) + p.detach()
            opt.step()
        runs.append(ps)
    out[name] = max((a - b).abs().max().item() for a, b in zip(*runs))
print(json.dumps(out))
"""


def test_the_shipped_vectorized_kernels_equal_the_loop() -> None:
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", SHIPPED_KERNELS], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["width"] == SHIPPED_BUCKET_WIDTH > 1
    assert out["vectorized"], "this CPU has no vector ISA inductor uses: the shipped kernels are scalar here too"
    for name in ("adamw", "adafactor"):
        assert out[name] <= 1e-12, (name, out[name])
