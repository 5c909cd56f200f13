"""Trajectories start where asked and converge where they should; the figures are written."""

from __future__ import annotations

import pytest
import torch

from stochopt.cli import main
from stochopt.viz import FUNCTIONS, bias_correction, momentum_memory, parse_optimizer, run_path, surface


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_paths_start_at_the_start_and_minima_are_stationary(name):
    function = surface(name)
    path = run_path(function, "sgd:lr=1e-3", start=(0.3, -0.2), steps=5)
    assert path.shape == (6, 2) and path[0].tolist() == [0.3, -0.2]
    for minimum in function.minima:
        xy = torch.tensor(minimum, dtype=torch.float64, requires_grad=True)
        function(xy).backward()
        assert xy.grad.abs().max() < 1e-4, (name, minimum)  # the listed minima are where the gradient vanishes


@pytest.mark.parametrize("spec", ["sgd:lr=0.02,momentum=0.9", "adam:lr=0.05", "torch.optim.SGD:lr=0.035"])
def test_converging_optimizers_end_near_the_quadratics_minimum(spec):
    path = run_path(surface("quadratic"), spec, steps=600)
    assert path[-1].norm() < 1e-3


def test_diverging_paths_stop_at_the_last_finite_point():
    path = run_path(surface("quadratic"), "sgd:lr=0.5", steps=2000)  # lr * 50 > 2: diverges along y
    assert len(path) < 2001 and torch.isfinite(path).all()


def test_parse_optimizer():
    assert parse_optimizer("adam:lr=0.1,betas=(0.8,0.9),amsgrad=True") == (
        "adam", {"lr": 0.1, "betas": (0.8, 0.9), "amsgrad": True})  # fmt: skip
    with pytest.raises(ValueError, match="key=value"):
        parse_optimizer("adam:0.1")
    with pytest.raises(ValueError, match="not a number"):
        parse_optimizer("adam:lr=fast")
    with pytest.raises(ValueError, match="unknown function"):
        surface("sphere")


def test_seed_figures_data():
    weights = momentum_memory((0.9,), 50)[0.9]
    assert weights[0] == 1.0 and weights[10] == pytest.approx(0.9**10)
    data = bias_correction(0.9, 0.999, 30)
    assert data["m"][0] == pytest.approx(0.1 * data["m_hat"][0])  # m_1 = (1 - beta1) g_1, m_hat_1 = g_1
    assert abs(data["step_hat"][0]) == pytest.approx(1.0, rel=1e-6)  # g_1 / |g_1|: a unit first step
    # uncorrected: (1 - beta1) g_1 / sqrt((1 - beta2) g_1^2), 3.2 times too large a first step
    assert abs(data["step"][0]) == pytest.approx(0.1 / 0.001**0.5, rel=1e-5)  # eps = 1e-8 aside


def test_cli_writes_png_gif_and_figures(tmp_path, capsys):
    png, gif, loss = tmp_path / "paths.png", tmp_path / "paths.gif", tmp_path / "loss.png"
    code = main(["viz", "--function", "beale", "--optimizers", "sgd:lr=1e-3,momentum=0.9;adam:lr=0.05",
                 "--steps", "40", "--png", str(png), "--gif", str(gif), "--loss-png", str(loss)])  # fmt: skip
    assert code == 0 and "adam:lr=0.05" in capsys.readouterr().out
    for path in (png, loss):
        assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 10_000
    assert gif.read_bytes()[:6] == b"GIF89a" and gif.stat().st_size > 10_000
    for figure in ("momentum", "bias-correction"):
        out = tmp_path / f"{figure}.png"
        assert main(["viz", figure, "--png", str(out)]) == 0
        assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 10_000
    assert main(["viz", "--function", "sphere"]) == 2
