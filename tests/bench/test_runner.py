"""One trial: stops at the target, seeded curves are identical, non-finite losses are failed runs."""

import math

import pytest
from tiny_workloads import Exploding, TinyClassifier, TinyRegression

from stochopt.bench.algorithms import load_algorithm
from stochopt.bench.runner import run_trial


@pytest.fixture(scope="module")
def regression():
    workload = TinyRegression()
    workload.setup()
    return workload


def test_same_seed_same_curve_other_seed_other_curve(regression):
    algorithm = load_algorithm("nadamw")
    point = algorithm.point({"lr": 0.02})
    runs = [run_trial(regression, algorithm, point, seed, 30) for seed in (3, 3, 4)]
    metrics = [[(step, metric) for step, _, metric in run.curve] for run in runs]
    assert metrics[0] == metrics[1]
    assert metrics[0] != metrics[2]
    assert [step for step, _ in metrics[0]] == [0, 5, 10, 15, 20, 25, 30]


def test_stops_at_the_first_evaluation_below_target(regression):
    algorithm = load_algorithm("heavy_ball")
    result = run_trial(regression, algorithm, algorithm.point({"lr": 0.05}), 0, 200, target=regression.target)
    assert result.reached and not result.failed
    steps, seconds, metrics = zip(*result.curve)
    assert metrics[-1] <= regression.target and all(m > regression.target for m in metrics[:-1])
    assert result.steps_to_target == steps[-1] == result.steps < 200
    assert result.seconds_to_target == seconds[-1] == result.train_seconds
    assert list(seconds) == sorted(seconds) and seconds[0] < seconds[1]  # step 0: the optimizer's set-up time


def test_without_target_runs_the_whole_budget_and_keeps_the_best(regression):
    algorithm = load_algorithm("adamw")
    result = run_trial(regression, algorithm, algorithm.point(), 0, 20, target=None)
    assert result.steps == 20 and not result.reached and math.isinf(result.seconds_to_target)
    assert result.best_metric == min(m for _, _, m in result.curve)


def test_non_finite_loss_is_a_failed_run_not_a_crash():
    workload = Exploding()
    workload.setup()
    algorithm = load_algorithm("adamw")
    result = run_trial(workload, algorithm, algorithm.point(), 0, 50, target=workload.target)
    assert result.failed and "non-finite training loss" in result.reason and result.steps == 8
    assert math.isinf(result.seconds_to_target) and math.isinf(result.steps_to_target)


def test_huge_learning_rate_diverges_into_a_failed_run(regression):
    algorithm = load_algorithm("heavy_ball")
    result = run_trial(regression, algorithm, algorithm.point({"lr": 1e6, "warmup_fraction": 0.0}), 0, 60, 0.05)
    assert result.failed and not result.reached


def test_bring_your_own_optimizer_by_import_path():
    workload = TinyClassifier()
    workload.setup()
    algorithm = load_algorithm("tiny_workloads:SignDescent")
    result = run_trial(workload, algorithm, algorithm.point({"lr": 0.05}), 0, 40, workload.target)
    assert result.reached


def test_batch_size_clipping_and_constant_schedule_from_the_search_space(regression, tmp_path):
    import torch

    space = tmp_path / "clipped_sgd.json"
    defaults = '{"lr": 0.1, "clip_norm": 0.001, "batch_size": 7, "warmup_fraction": 0.0}'
    space.write_text(f'{{"optimizer": "torch.optim.SGD", "schedule": {{"decay": "constant"}}, "defaults": {defaults}}}')
    algorithm = load_algorithm(str(space))
    result = run_trial(regression, algorithm, algorithm.point(), 11, 2)
    # the same two steps by hand: 7-example batches, gradient norm clipped to 1e-3, plain SGD at a constant lr
    model = regression.init_model(11)
    batches = regression.train_batches(7, 11)
    for _ in range(2):
        x, y = next(batches)
        assert x.shape[0] == 7
        model.zero_grad()
        regression.loss(model, (x, y)).backward()
        grads = [p.grad for p in model.parameters()]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads):
                p -= 0.1 * g * min(1.0, 0.001 / (float(norm) + 1e-6))
    assert result.curve[-1][2] == pytest.approx(regression.evaluate(model), rel=1e-6)


def test_optimizer_train_and_eval_modes_around_each_evaluation():
    """Schedule-Free's convention: train() before the first step, eval() before each evaluation (the workload
    evaluates the optimizer's evaluation weights), train() after it, and no step in eval mode."""
    import faulty

    workload = faulty.Recording()
    workload.setup()
    algorithm = load_algorithm("faulty:TrainEvalSGD")
    faulty.LOG.clear()
    result = run_trial(workload, algorithm, algorithm.point({"lr": 0.05, "warmup_fraction": 0.0}), 0, 12)
    log = faulty.LOG
    assert not result.failed and [step for step, _, _ in result.curve] == [0, 5, 10, 12]
    kinds = [entry[0] for entry in log]
    evaluation = ["eval", "evaluate", "train"]
    assert kinds == ["train", *evaluation, *(["step"] * 5 + evaluation) * 2, "step", "step", *evaluation]
    for i, kind in enumerate(kinds):
        if kind == "evaluate":
            eval_weights, evaluated, training = log[i - 1][1], log[i][1], log[i][2]
            assert evaluated == eval_weights and not training  # the eval-mode weights, the model in eval mode
            following = next((e for e in log[i + 1 :] if e[0] == "step"), None)
            if following is not None:  # back to the training weights for the next step
                assert following[1] == pytest.approx([w - 1000.0 for w in eval_weights], abs=1e-3)
