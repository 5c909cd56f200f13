"""The provisional-target script's single run: warmup + cosine for the workload's budget, best value reached."""

from __future__ import annotations

import math

import torch

from stochopt.bench.workloads import load_workload
from stochopt.bench.workloads.provisional_targets import BASELINES, best_value


def test_a_baseline_run_reports_the_best_validation_value_it_reached():
    workload = load_workload("logistic")
    workload.setup()
    with torch.no_grad():
        untrained = workload.evaluate(workload.init_model(0))
    best = best_value("logistic", BASELINES["nesterov"], 0.1)
    assert math.isfinite(best) and best < 0.2 * untrained
    assert best_value("logistic", BASELINES["heavy_ball"], 1e-4) > 2 * best  # a learning rate far too small
