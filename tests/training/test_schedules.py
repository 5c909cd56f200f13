"""Schedules against their formulas written out here, through a state_dict save and load mid-schedule."""

from __future__ import annotations

import io
import math

import pytest
import torch

from stochopt.cli import main
from stochopt.training import SCHEDULES, InverseSqrtLR, WarmupDecayLR, WarmupStableDecayLR, schedule_curve

BASE_LRS = (0.1, 0.03)


def make_optimizer() -> torch.optim.Optimizer:
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    return torch.optim.SGD([{"params": [a], "lr": BASE_LRS[0]}, {"params": [b], "lr": BASE_LRS[1]}])


def warmup_cosine(t, W, T, r):  # AlgoPerf: linear from 0 over W steps, then cosine over T - W steps to r
    if t < W:
        return t / W
    x = min((t - W) / (T - W), 1.0)
    return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * x))


def warmup_linear(t, W, T, r):
    return t / W if t < W else r + (1 - r) * (1 - min((t - W) / (T - W), 1.0))


def wsd(t, W, T, D, r, kind):
    if t < W:
        return t / W
    if t < T - D:
        return 1.0
    x = min((t - (T - D)) / D, 1.0)
    shape = {"linear": 1 - x, "sqrt": 1 - math.sqrt(x), "cosine": 0.5 * (1 + math.cos(math.pi * x))}[kind]
    return r + (1 - r) * shape


def inverse_sqrt(t, W, tau):
    return t / W if t < W else math.sqrt(tau / (t - W + tau))


CASES = {
    "warmup-cosine": (lambda o: WarmupDecayLR(o, 10, 100, "cosine", 0.1), lambda t: warmup_cosine(t, 10, 100, 0.1)),
    "warmup-linear": (lambda o: WarmupDecayLR(o, 5, 60, "linear", 0.0), lambda t: warmup_linear(t, 5, 60, 0.0)),
    "cosine-no-warmup": (lambda o: WarmupDecayLR(o, 0, 50), lambda t: warmup_cosine(t, 0, 50, 0.0)),
    "wsd-linear": (lambda o: WarmupStableDecayLR(o, 10, 100, 20), lambda t: wsd(t, 10, 100, 20, 0.0, "linear")),
    "wsd-sqrt": (lambda o: WarmupStableDecayLR(o, 4, 80, 30, "sqrt", 0.05), lambda t: wsd(t, 4, 80, 30, 0.05, "sqrt")),
    "wsd-cosine": (lambda o: WarmupStableDecayLR(o, 0, 40, 40, "cosine"), lambda t: wsd(t, 0, 40, 40, 0, "cosine")),
    "inverse-sqrt": (lambda o: InverseSqrtLR(o, 8), lambda t: inverse_sqrt(t, 8, 8)),
    "inverse-sqrt-tau": (lambda o: InverseSqrtLR(o, 0, timescale=25.0), lambda t: inverse_sqrt(t, 0, 25.0)),
}  # fmt: skip


def lrs_over(opt, scheduler, steps) -> list[list[float]]:
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_schedule_matches_its_formula_through_a_resume(case):
    build, formula = CASES[case]
    opt = make_optimizer()
    scheduler = build(opt)
    seen = lrs_over(opt, scheduler, 37)
    buffer = io.BytesIO()
    torch.save({"scheduler": scheduler.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)

    resumed_opt = make_optimizer()
    resumed = build(resumed_opt)
    resumed_opt.load_state_dict(saved["optimizer"])
    resumed.load_state_dict(saved["scheduler"])
    seen += lrs_over(resumed_opt, resumed, 120 - 37)
    for t, lrs in enumerate(seen):
        for base, lr in zip(BASE_LRS, lrs):
            assert lr == pytest.approx(base * formula(t), rel=1e-12, abs=1e-15), (case, t)


def test_chosen_points():
    opt = make_optimizer()
    lrs = [g[0] / BASE_LRS[0] for g in lrs_over(opt, WarmupDecayLR(opt, 10, 110, "cosine", 0.2), 120)]
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.2 + 0.8 * 0.5)  # half-way through the decay
    assert lrs[110] == pytest.approx(0.2) and lrs[119] == pytest.approx(0.2)  # the floor, held
    opt = make_optimizer()
    lrs = [g[0] / BASE_LRS[0] for g in lrs_over(opt, InverseSqrtLR(opt, 100), 401)]
    assert lrs[100] == pytest.approx(1.0) and lrs[400] == pytest.approx(0.5)  # sqrt(100 / 400)


def test_multiplier_composes_and_stays_out_of_the_state_dict():
    opt = make_optimizer()
    scheduler = WarmupDecayLR(opt, 10, 100, multiplier=lambda t: 2.0 if t >= 20 else 1.0)
    lrs = lrs_over(opt, scheduler, 30)
    assert lrs[25][1] == pytest.approx(BASE_LRS[1] * 2.0 * warmup_cosine(25, 10, 100, 0.0))
    state = scheduler.state_dict()
    assert "multiplier" not in state
    torch.save(state, io.BytesIO())  # a lambda in the state would not pickle
    scheduler.load_state_dict(state)
    assert scheduler.multiplier is not None


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda o: WarmupDecayLR(o, 20, 10), "warmup_steps"),
        (lambda o: WarmupDecayLR(o, 0, 10, decay="exp"), "decay"),
        (lambda o: WarmupDecayLR(o, 0, 10, final_lr_ratio=1.5), "final_lr_ratio"),
        (lambda o: WarmupDecayLR(o, -1, 10), "warmup_steps"),
        (lambda o: WarmupStableDecayLR(o, 10, 20, 15), "decay_steps"),
        (lambda o: InverseSqrtLR(o, 0, timescale=0.0), "timescale"),
        (lambda o: WarmupDecayLR(o, 0, 10, multiplier=3.0), "multiplier"),
    ],
)
def test_bad_arguments_are_named(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build(make_optimizer())


def test_schedule_curve_uses_the_real_schedulers():
    lrs = schedule_curve("wsd", lr=0.5, total_steps=100, warmup_steps=10, decay_steps=20)
    assert lrs == pytest.approx([0.5 * wsd(t, 10, 100, 20, 0.0, "linear") for t in range(100)])
    onecycle = schedule_curve("onecycle", lr=0.5, total_steps=100, warmup_steps=30)
    assert max(onecycle) == pytest.approx(0.5) and onecycle.index(max(onecycle)) == 29
    with pytest.raises(ValueError, match="unknown schedule 'nope'"):
        schedule_curve("nope")


def test_cli_prints_and_plots_every_schedule(tmp_path, capsys):
    png = tmp_path / "schedules.png"
    assert main(["schedule", ",".join(SCHEDULES), "--steps", "200", "--warmup", "20", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SCHEDULES)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert main(["schedule", "nope"]) == 2
    assert "unknown schedule" in capsys.readouterr().err
