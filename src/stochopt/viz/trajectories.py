"""Optimizer paths on a 2-D test function: a contour plot with the paths, an animation, the loss curves."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from stochopt.extras import require
from stochopt.registry import create_optimizer
from stochopt.viz.functions import Surface


def parse_optimizer(spec: str) -> tuple[str, dict[str, Any]]:
    """``"sgd:lr=0.01,momentum=0.9"`` -> ("sgd", {"lr": 0.01, "momentum": 0.9}); values are Python literals
    (numbers, True/False, tuples such as ``betas=(0.9,0.99)``)."""
    import ast

    name, _, rest = spec.strip().partition(":")
    hyperparameters: dict[str, Any] = {}
    for item in _split_top_level(rest):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"optimizer spec {spec!r}: {item!r} is not key=value")
        try:
            hyperparameters[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise ValueError(f"optimizer spec {spec!r}: the value of {key.strip()} ({value!r}) is not a number, "
                             "bool or tuple") from None  # fmt: skip
    return name.strip(), hyperparameters


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "(["
        depth -= ch in ")]"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [p for p in [*parts, current] if p.strip()]


def run_path(function: Surface, optimizer: str, start: tuple[float, float] | None = None,
             steps: int = 200) -> Tensor:  # fmt: skip
    """The ``steps + 1`` points (float64) an optimizer visits from ``start``; it stops early, and says so with
    a shorter path, when the iterate leaves the finite numbers."""
    name, hyperparameters = parse_optimizer(optimizer)
    xy = torch.tensor(start if start is not None else function.start, dtype=torch.float64, requires_grad=True)
    if name.startswith("torch.optim."):
        cls = getattr(torch.optim, name.removeprefix("torch.optim."), None)
        if cls is None:
            raise ValueError(f"unknown optimizer {name!r}")
        opt = cls([xy], **hyperparameters)
    else:
        opt = create_optimizer(name, [xy], **hyperparameters)
    points = [xy.detach().clone()]
    for _ in range(steps):
        opt.zero_grad()
        function(xy).backward()
        opt.step()
        if not torch.isfinite(xy).all():
            break
        points.append(xy.detach().clone())
    return torch.stack(points)


def _grid(function: Surface, n: int = 300) -> tuple[Tensor, Tensor, Tensor]:
    xs = torch.linspace(*function.x_range, n, dtype=torch.float64)
    ys = torch.linspace(*function.y_range, n, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    return gx, gy, function.f(gx, gy)


def _contour(ax: Any, function: Surface) -> None:
    gx, gy, z = _grid(function)
    if function.log_levels:
        z = torch.log10(z - z.min() + 1e-3)
    ax.contourf(gx.numpy(), gy.numpy(), z.numpy(), levels=40, cmap="viridis", alpha=0.85)
    ax.contour(gx.numpy(), gy.numpy(), z.numpy(), levels=20, colors="white", linewidths=0.4, alpha=0.5)
    for mx, my in function.minima:
        ax.plot(mx, my, marker="*", color="white", markersize=14, markeredgecolor="black")
    ax.set(xlim=function.x_range, ylim=function.y_range, xlabel="x", ylabel="y", title=function.name)


def plot_paths(function: Surface, paths: dict[str, Tensor], png: str, loss_png: str | None = None) -> None:
    """Contour plot with each path; with ``loss_png``, also f against step (log scale)."""
    require("matplotlib", feature="the trajectory pictures")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 6), layout="constrained")
    ax = fig.add_subplot()
    _contour(ax, function)
    for label, points in paths.items():
        ax.plot(points[:, 0], points[:, 1], marker=".", markersize=3, linewidth=1.2, label=label)
    first = next(iter(paths.values()))
    ax.plot(first[0, 0], first[0, 1], marker="o", color="red", markersize=8, label="start")
    ax.legend(loc="best", fontsize=8)
    fig.savefig(png, dpi=120)
    if loss_png:
        fig = Figure(figsize=(7, 4), layout="constrained")
        ax = fig.add_subplot()
        floor = min(function(m).item() for m in torch.tensor(function.minima, dtype=torch.float64))
        for label, points in paths.items():
            ax.semilogy((function(points) - floor).clamp_min(1e-16).numpy(), label=label)
        ax.set(xlabel="step", ylabel="f - f*", title=f"{function.name}: loss against steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.savefig(loss_png, dpi=120)


def animate_paths(function: Surface, paths: dict[str, Tensor], gif: str, frames: int = 60, fps: int = 15) -> None:
    """A GIF of the paths growing step by step (at most ``frames`` frames, steps spread evenly over them)."""
    require("matplotlib", feature="the trajectory pictures")
    from matplotlib.animation import FuncAnimation, PillowWriter
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 5), layout="constrained")
    ax = fig.add_subplot()
    _contour(ax, function)
    lines = {label: ax.plot([], [], marker=".", markersize=3, linewidth=1.2, label=label)[0] for label in paths}
    ax.legend(loc="best", fontsize=8)
    longest = max(len(p) for p in paths.values())
    frames = max(1, min(frames, longest))
    ends = [math.ceil((i + 1) * longest / frames) for i in range(frames)]

    def draw(i: int) -> list[Any]:
        for label, points in paths.items():
            shown = points[: ends[i]]
            lines[label].set_data(shown[:, 0].numpy(), shown[:, 1].numpy())
        return list(lines.values())

    FuncAnimation(fig, draw, frames=frames, blit=False).save(gif, writer=PillowWriter(fps=fps))
