"""The seeds' small figures: how long momentum remembers, and what Adam's bias correction does early on."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from stochopt.extras import require


def momentum_memory(betas: Sequence[float] = (0.5, 0.9, 0.99), steps: int = 100) -> dict[float, list[float]]:
    r"""The weight :math:`\beta^n` heavy-ball momentum gives a gradient :math:`n` steps old."""
    return {beta: [beta**n for n in range(steps)] for beta in betas}


def bias_correction(beta1: float = 0.9, beta2: float = 0.999, steps: int = 50, seed: int = 0) -> dict[str, list[float]]:
    r"""Adam's moments of a noisy gradient :math:`g_t \sim \mathcal N(1, 0.5^2)`, raw and bias-corrected:
    the raw EMAs start near 0 (:math:`m_1 = (1-\beta_1) g_1`), the corrected ones near the true moments."""
    g = 1.0 + 0.5 * torch.randn(steps, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    m = v = 0.0
    out: dict[str, list[float]] = {"m": [], "m_hat": [], "v": [], "v_hat": [], "step": [], "step_hat": []}
    for t in range(1, steps + 1):
        m = beta1 * m + (1 - beta1) * g[t - 1].item()
        v = beta2 * v + (1 - beta2) * g[t - 1].item() ** 2
        m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
        for key, value in (("m", m), ("m_hat", m_hat), ("v", v), ("v_hat", v_hat),
                           ("step", m / (v**0.5 + 1e-8)), ("step_hat", m_hat / (v_hat**0.5 + 1e-8))):  # fmt: skip
            out[key].append(value)
    return out


def plot_momentum_memory(png: str, betas: Sequence[float] = (0.5, 0.9, 0.99), steps: int = 100) -> None:
    require("matplotlib", feature="the figures")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    for beta, weights in momentum_memory(betas, steps).items():
        ax.plot(weights, label=rf"$\beta$ = {beta} (horizon 1/(1-$\beta$) = {1 / (1 - beta):.0f})")
    ax.set(xlabel="n (steps ago)", ylabel=r"weight $\beta^n$", title="the memory of momentum")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(png, dpi=120)


def plot_bias_correction(png: str, beta1: float = 0.9, beta2: float = 0.999, steps: int = 50) -> None:
    require("matplotlib", feature="the figures")
    from matplotlib.figure import Figure

    data = bias_correction(beta1, beta2, steps)
    fig = Figure(figsize=(10, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    t = range(1, steps + 1)
    for key, label in (("m", "$m_t$"), ("m_hat", r"$\hat m_t$"), ("v", "$v_t$"), ("v_hat", r"$\hat v_t$")):
        left.plot(t, data[key], label=label, linestyle="--" if "hat" not in key else "-")
    left.set(xlabel="step t", title=rf"moments of g ~ N(1, 0.25), $\beta_1$={beta1}, $\beta_2$={beta2}")
    right.plot(t, data["step"], "--", label=r"$m_t / \sqrt{v_t}$ (no correction)")
    right.plot(t, data["step_hat"], label=r"$\hat m_t / \sqrt{\hat v_t}$")
    right.set(xlabel="step t", title="Adam's step (per unit lr)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(png, dpi=120)
