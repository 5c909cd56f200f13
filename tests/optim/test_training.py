"""The optimizers of the layer-wise, memory-lean and wrapper family train a small MLP, each with hyperparameters
of the kind its paper recommends; a broken update (wrong sign, missing step, NaN) would fail these bounds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stochopt


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 10, generator=gen) * 2.5
    labels = torch.arange(512) % 4
    return centers[labels] + torch.randn(512, 10, generator=gen), labels


def _train(make_optimizer, steps: int = 150) -> tuple[float, float, float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 4))
    x, y = _data()
    opt = make_optimizer(model)
    first = nn.functional.cross_entropy(model(x), y).item()
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = model(x)
    return first, nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def _groups(model: nn.Module, **no_decay: object) -> list[dict]:
    """Matrices in one group, biases in another with the options the papers exclude them with."""
    matrices = [p for p in model.parameters() if p.dim() > 1]
    vectors = [p for p in model.parameters() if p.dim() <= 1]
    return [{"params": matrices}, {"params": vectors, **no_decay}]


OPTIMIZERS = {
    "lamb": lambda m: stochopt.Lamb(_groups(m, weight_decay=0.0, trust_ratio=False), lr=0.02, weight_decay=0.01),
    "lars": lambda m: stochopt.Lars(m.parameters(), lr=2.0, momentum=0.9, weight_decay=1e-4, trust_coefficient=0.02),
    "adafactor": lambda m: stochopt.Adafactor(m.parameters(), lr=None),
    "adafactor-beta1": lambda m: stochopt.Adafactor(m.parameters(), lr=None, beta1=0.9),
    "ranger": lambda m: stochopt.Ranger(m.parameters(), lr=0.01),
    "lookahead-sgd": lambda m: stochopt.Lookahead(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)),
    "lookahead-adam": lambda m: stochopt.Lookahead(stochopt.Adam(m.parameters(), lr=0.01), k=5, alpha=0.5),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_trains_a_small_mlp(name: str) -> None:
    first, last, accuracy = _train(OPTIMIZERS[name])
    assert last < 0.25 * first, (first, last)
    assert accuracy > 0.9
