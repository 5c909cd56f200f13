"""Algorithms as data: the shipped search spaces, optimizers by name or import path, clear parse errors."""

import pytest
import torch
from torch import nn

from stochopt.bench.algorithms import (
    BASELINES,
    build_optimizer,
    load_algorithm,
    optimizer_kwargs,
    parse_space,
    resolve_optimizer,
    shipped_algorithms,
)
from stochopt.optim import Lion, NAdam


def test_every_shipped_space_parses_and_builds_its_optimizer_from_defaults_and_range_ends():
    names = shipped_algorithms()
    assert set(BASELINES) <= set(names) and {"lion", "lamb", "adafactor", "lazyadam"} <= set(names)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    for name in names:
        algorithm = load_algorithm(name)
        assert algorithm.search and set(algorithm.search) <= set(algorithm.defaults)
        for end in ("low", "high"):
            point = algorithm.point({k: getattr(r, end) for k, r in algorithm.search.items()})
            optimizer = build_optimizer(algorithm, model, point)
            assert isinstance(optimizer, torch.optim.Optimizer)


def test_nadamw_maps_one_minus_and_betas_to_nadam_with_decoupled_decay():
    algorithm = load_algorithm("nadamw")
    optimizer = build_optimizer(algorithm, nn.Linear(3, 2), algorithm.point({"one_minus_beta1": 0.2, "lr": 0.01}))
    assert isinstance(optimizer, NAdam)
    group = optimizer.param_groups[0]
    assert group["betas"] == pytest.approx((0.8, 1 - algorithm.defaults["one_minus_beta2"]))
    assert group["decoupled_weight_decay"] is True and group["lr"] == 0.01
    # the bias is excluded from weight decay (stochopt.training.param_groups)
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, algorithm.defaults["weight_decay"]]


def test_runner_keys_are_not_passed_and_beta1_alone_keeps_the_default_beta2():
    kwargs = optimizer_kwargs(Lion, {"lr": 1e-3, "beta1": 0.8, "warmup_fraction": 0.1, "clip_norm": 1.0}, {})
    assert kwargs == {"lr": 1e-3, "betas": (0.8, 0.99)}


def test_beta3_joins_betas_and_steps_fractions_scale_with_the_budget():
    from stochopt import AdEMAMix

    point = {"one_minus_beta3": 0.01, "alpha_warmup_steps_fraction": 0.5, "beta3_warmup_steps_fraction": 1e-9}
    kwargs = optimizer_kwargs(AdEMAMix, point, {}, max_steps=300)
    assert kwargs == {"betas": (0.9, 0.999, 0.99), "alpha_warmup": 150, "beta3_warmup": 1}
    bad = "description = 'x'\noptimizer = 'ademamix'\n[defaults]\nalpha_warmup_steps_fraction = 0.0\n"
    with pytest.raises(ValueError, match="alpha_warmup_steps_fraction must be > 0"):
        parse_space(bad, "x", "inline")


def test_optimizers_by_registered_name_dotted_path_and_colon_path():
    assert resolve_optimizer("lion") is Lion
    assert resolve_optimizer("torch.optim.AdamW") is torch.optim.AdamW
    assert resolve_optimizer("torch.optim:SGD") is torch.optim.SGD
    algorithm = load_algorithm("torch.optim.AdamW")  # bring your own: own defaults, generic lr range
    assert algorithm.optimizer == "torch.optim.AdamW" and "lr" in algorithm.search


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("adamz", "unknown optimizer 'adamz'"),
        ("nosuchpackage.opt:Opt", "cannot import optimizer 'nosuchpackage.opt:Opt'"),
        ("torch.optim:NoSuch", "cannot import optimizer 'torch.optim:NoSuch'"),
        ("torch.nn:Linear", "not a torch.optim.Optimizer subclass"),
    ],
)
def test_bad_optimizers_are_one_clear_value_error(spec, message):
    with pytest.raises(ValueError, match=message):
        load_algorithm(spec)


GOOD = """optimizer = "adamw"
[defaults]
lr = 1e-3
[search]
lr = { low = 1e-4, high = 1e-2, log = true }
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("optimizer = adamw", "does not parse"),
        ('optimizer = "adamw"\nlearning_rate = 1', r"unknown keys \['learning_rate'\]"),
        ("[defaults]\nlr = 1", "needs optimizer"),
        (GOOD.replace("low = 1e-4", "low = 0"), "a log range needs low > 0"),
        (GOOD.replace("high = 1e-2", "high = 1e-5"), "must be below high"),
        (GOOD.replace("high = 1e-2", 'high = "x"'), "must be numbers"),
        (GOOD.replace("lr = 1e-3", "eps = 1e-8"), r"\[defaults\] lacks \['lr'\]"),
        (GOOD + "\n[fixed]\nmomentum = 0.9\n", r"AdamW takes no \['momentum'\]"),
        (GOOD + '\n[schedule]\ndecay = "exp"\n', "decay = 'exp'"),
        (GOOD.replace('"adamw"', '"nope:Opt"'), "cannot import optimizer"),
    ],
)
def test_bad_search_spaces_name_the_file_and_the_problem(text, message, tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        load_algorithm(str(path))
    assert str(path) in str(err.value)


def test_a_json_search_space_file(tmp_path):
    path = tmp_path / "sgd_space.json"
    path.write_text('{"optimizer": "sgd", "defaults": {"lr": 0.1, "one_minus_momentum": 0.1}, '
                    '"search": {"lr": {"low": 0.01, "high": 1.0, "log": true}}}')  # fmt: skip
    algorithm = load_algorithm(str(path))
    assert algorithm.name == "sgd_space"
    optimizer = build_optimizer(algorithm, nn.Linear(2, 1), algorithm.point())
    assert optimizer.param_groups[0]["momentum"] == pytest.approx(0.9)
    assert parse_space(GOOD, "x", "x.toml").search["lr"].log
