"""Other libraries' optimizers through the runner by import path, each checked against a training loop written by
hand as the library documents it: heavyball's AdamW (it drops ``p.grad`` in its step and compiles its kernels),
Schedule-Free AdamW (``optimizer.train()``/``.eval()``) and pytorch_optimizer's Lamb."""

import json
import time
import warnings

import heavyball
import pytest
import schedulefree
import torch
from pytorch_optimizer import Lamb
from tiny_workloads import TinyRegression

from stochopt.bench.algorithms import load_algorithm
from stochopt.bench.runner import run_trial

STEPS = 12  # evaluations at steps 0, 5, 10 and 12


@pytest.fixture(scope="module")
def workload():
    workload = TinyRegression()
    workload.setup()
    return workload


def algorithm(tmp_path, optimizer, **defaults):
    """``optimizer`` at a constant learning rate without warmup, so that a loop by hand can follow it."""
    space = tmp_path / f"{optimizer.replace(':', '_').replace('.', '_')}.json"
    defaults = {"warmup_fraction": 0.0, **defaults}
    space.write_text(json.dumps({"optimizer": optimizer, "schedule": {"decay": "constant"}, "defaults": defaults}))
    return load_algorithm(str(space))


def by_hand(workload, make, seed, steps, train=False, eval=False):
    """The validation curve of the documented loop; ``train``: ``optimizer.train()`` before training, ``eval``:
    ``optimizer.eval()`` before each evaluation and ``train()`` after it, as Schedule-Free asks."""
    torch.manual_seed(seed)
    model = workload.init_model(seed)
    optimizer = make(model.parameters())
    batches = workload.train_batches(workload.batch_size, seed)
    metrics = []

    def evaluate():
        if eval:
            optimizer.eval()
        with torch.no_grad():
            metrics.append(workload.evaluate(model))
        if eval:
            optimizer.train()

    if train:
        optimizer.train()
    evaluate()
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        workload.loss(model, next(batches)).backward()
        optimizer.step()
        if step % workload.eval_every == 0 or step == steps:
            evaluate()
    return metrics


def metrics(result):
    assert not result.failed, result.reason
    return [m for _, _, m in result.curve]


def test_heavyball_adamw_drops_the_gradient_and_still_runs(workload, tmp_path, monkeypatch):
    monkeypatch.setattr(heavyball.utils, "compile_mode", None)  # eager: the compiled run is the next test
    algo = algorithm(tmp_path, "heavyball:AdamW", lr=0.02, weight_decay=0.0)
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.ones(3)
    heavyball.AdamW([param], lr=0.1).step()
    assert param.grad is None  # what the runner must live with: nothing after optimizer.step() reads p.grad
    result = run_trial(workload, algo, algo.point(), 0, STEPS)
    expected = by_hand(workload, lambda p: heavyball.AdamW(p, lr=0.02, weight_decay=0.0), 0, STEPS)
    assert metrics(result) == pytest.approx(expected, rel=1e-6)
    assert expected[-1] < 0.8 * expected[0]


def test_heavyball_adamw_compiled_pays_its_compilation_in_the_trial(workload, tmp_path, monkeypatch):
    """heavyball compiles its update (torch.compile, once per process and shapes) by default: the trial's clock
    pays it, as it pays any first-step compilation. Two steps keep the test short; the compilation dominates."""
    monkeypatch.setattr(heavyball.utils, "compile_mode", None)
    algo = algorithm(tmp_path, "heavyball:AdamW", lr=0.02, weight_decay=0.0)
    eager = run_trial(workload, algo, algo.point(), 0, 2)
    monkeypatch.undo()
    assert heavyball.utils.compile_mode is not None
    start = time.perf_counter()
    compiled = run_trial(workload, algo, algo.point(), 0, 2)
    wall = time.perf_counter() - start
    assert metrics(compiled) == pytest.approx(metrics(eager), rel=1e-5)
    print(f"heavyball AdamW, 2 compiled steps: {compiled.train_seconds:.2f} s of training, {wall:.2f} s in all")


def test_schedule_free_adamw_is_evaluated_at_its_average(workload, tmp_path):
    algo = algorithm(tmp_path, "schedulefree:AdamWScheduleFree", lr=0.02, weight_decay=0.0)
    result = run_trial(workload, algo, algo.point(), 0, STEPS)
    make = lambda p: schedulefree.AdamWScheduleFree(p, lr=0.02, weight_decay=0.0)
    expected = by_hand(workload, make, 0, STEPS, train=True, eval=True)
    assert metrics(result) == pytest.approx(expected, rel=1e-6)
    # evaluating the training point y instead of the average x would give another curve
    assert metrics(result)[1:] != pytest.approx(by_hand(workload, make, 0, STEPS, train=True), rel=1e-3)


def test_pytorch_optimizer_lamb(workload, tmp_path):
    algo = algorithm(tmp_path, "pytorch_optimizer:Lamb", lr=0.02, weight_decay=0.0)
    result = run_trial(workload, algo, algo.point(), 0, STEPS)
    expected = by_hand(workload, lambda p: Lamb(p, lr=0.02, weight_decay=0.0), 0, STEPS)
    assert metrics(result) == pytest.approx(expected, rel=1e-6)
    assert expected[-1] < expected[0]


@pytest.mark.parametrize("optimizer", ["heavyball:AdamW", "schedulefree:AdamWScheduleFree", "pytorch_optimizer:Lamb"])
def test_peers_by_import_path_with_the_generic_search_space(optimizer, workload, monkeypatch):
    """As ``stochopt bench --algorithms heavyball:AdamW`` takes them: their own defaults, the generic lr range,
    the default warmup and cosine decay (heavyball warns that its lr changes between steps: supported)."""
    monkeypatch.setattr(heavyball.utils, "compile_mode", None)
    algo = load_algorithm(optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Learning rate changed between steps")
        result = run_trial(workload, algo, algo.point({"lr": 0.01}), 0, 20)
    curve = metrics(result)
    assert curve[-1] < curve[0]
