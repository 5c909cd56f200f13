"""Two-dimensional test functions for optimizer trajectories, written on tensors so autograd gives gradients."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Surface:
    name: str
    f: Callable[[Tensor, Tensor], Tensor]
    start: tuple[float, float]  # the usual starting point of the demonstrations
    minima: tuple[tuple[float, float], ...]
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    log_levels: bool = True  # contour levels on a log scale (functions with a wide range of values)

    def __call__(self, xy: Tensor) -> Tensor:
        return self.f(xy[..., 0], xy[..., 1])


FUNCTIONS = {
    f.name: f
    for f in [
        Surface("rosenbrock", lambda x, y: (1 - x) ** 2 + 100 * (y - x**2) ** 2,
                     (-1.5, 2.0), ((1.0, 1.0),), (-2.0, 2.0), (-1.0, 3.0)),
        Surface("rastrigin", lambda x, y: 20 + x**2 - 10 * torch.cos(2 * math.pi * x) + y**2
                     - 10 * torch.cos(2 * math.pi * y), (-2.2, 2.4), ((0.0, 0.0),), (-4.5, 4.5), (-4.5, 4.5), False),
        Surface("beale", lambda x, y: (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2
                     + (2.625 - x + x * y**3) ** 2, (1.0, 1.4), ((3.0, 0.5),), (-4.5, 4.5), (-4.5, 4.5)),
        Surface("himmelblau", lambda x, y: (x**2 + y - 11) ** 2 + (x + y**2 - 7) ** 2, (-0.3, -0.9),
                     ((3.0, 2.0), (-2.805118, 3.131312), (-3.779310, -3.283186), (3.584428, -1.848126)),
                     (-5.0, 5.0), (-5.0, 5.0)),
        # a saddle at the origin between two minima at y = +-1: methods that start on the ridge must escape it
        Surface("saddle", lambda x, y: x**2 + y**4 / 4 - y**2 / 2, (-1.5, 1e-3), ((0.0, 1.0), (0.0, -1.0)),
                     (-2.0, 2.0), (-1.6, 1.6), False),
        # condition number 50: gradient descent zig-zags across the narrow valley
        Surface("quadratic", lambda x, y: 0.5 * (x**2 + 50 * y**2), (-4.0, 1.0), ((0.0, 0.0),),
                     (-5.0, 5.0), (-1.5, 1.5)),
    ]
}  # fmt: skip


def surface(name: str) -> Surface:
    try:
        return FUNCTIONS[name]
    except KeyError:
        raise ValueError(f"unknown function {name!r}; known: {', '.join(FUNCTIONS)}") from None
