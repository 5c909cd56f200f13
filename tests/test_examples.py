"""The example scripts run and learn: the plain loop with every training technique, and the Lightning one."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import stochopt

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


def test_lean_state_counts_the_parameters_whose_state_is_8_bit():
    big, small = torch.zeros(4096, requires_grad=True), torch.zeros(10, requires_grad=True)
    for state_dtype, expected in (("int8", 4096 / 4106), (torch.bfloat16, 0.0)):
        opt = stochopt.AdamW([big, small], lr=1e-3, foreach=False, state_dtype=state_dtype)
        big.grad, small.grad = torch.ones_like(big), torch.ones_like(small)
        opt.step()
        assert load("lean_state").eight_bit_fraction(opt) == pytest.approx(expected)
