"""The example scripts run and learn: the plain loop with every training technique, and the Lightning one."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the Lightning example imports train_digits by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("precision", ["bf16-master", "autocast", "fp32"])
def test_train_digits_with_every_technique(precision, capsys):
    result = load("train_digits").main(["--steps", "120", "--precision", precision])
    assert result["val_accuracy"] > 0.9  # measured 0.96-0.97; a 10-class guess is 0.1
    if precision == "bf16-master":
        assert 16.0 <= result["bytes_per_param"] < 16.1
    out = capsys.readouterr().out
    assert "batch 256" in out and "clipped units" in out  # the ramp reached its end size; clipping logged


def test_lightning_example():
    pytest.importorskip("lightning", reason="Lightning is an optional dependency (pip install -e '.[examples]')")
    result = load("lightning_digits").main(["--steps", "60"])
    assert result["steps"] == 60
    assert result["val_accuracy"] > 0.85


def test_lean_state_example_runs_every_configuration():
    result = load("lean_state").main(
        ["--workloads", "digits_mlp", "--steps", "20", "--seeds", "1", "--speed-params", "0"]
    )
    losses = result["quality"]["digits_mlp"]
    assert set(losses) == set(load("lean_state").CONFIGS)
    assert all(0 < loss[0] < 2.5 for loss in losses.values())  # 20 steps from ln(10) = 2.30: finite and learning
