"""Recipe: stochopt's optimizers under Hugging Face ``accelerate`` (docs/recipes.md): ``prepare``, and
``save_state``/``load_state`` resuming exactly, in the default and the fused path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stochopt
from stochopt.training import WarmupDecayLR

accelerate = pytest.importorskip("accelerate")  # a test dependency: missing, the suite's install is broken


def batches(start: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for step in range(start, start + count):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(16, 8, generator=gen)
        out.append((x, x.sum(1, keepdim=True).sin()))
    return out


def setup(seed: int, options: dict):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1))
    opt = stochopt.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, **options)
    schedule = WarmupDecayLR(opt, warmup_steps=2, total_steps=12)
    accelerator = accelerate.Accelerator(cpu=True)
    return accelerator, *accelerator.prepare(model, opt, schedule)


def train(accelerator, model, opt, schedule, data) -> None:
    for x, y in data:
        opt.zero_grad()
        accelerator.backward(nn.functional.mse_loss(model(x), y))
        opt.step()
        schedule.step()


@pytest.mark.parametrize("options", [{}, {"fused": True}], ids=["default", "fused"])
def test_save_state_and_load_state_resume_exactly(tmp_path, options):
    accelerator, model, opt, schedule = setup(0, options)
    train(accelerator, model, opt, schedule, batches(0, 3))
    accelerator.save_state(str(tmp_path))
    train(accelerator, model, opt, schedule, batches(3, 3))
    expected = [p.detach().clone() for p in model.parameters()]

    accelerator, model, opt, schedule = setup(1, options)  # other initial weights: all must come from the files
    accelerator.load_state(str(tmp_path))
    assert schedule.scheduler.last_epoch == 3 and all(opt.state[p]["step"] == 3 for p in model.parameters())
    train(accelerator, model, opt, schedule, batches(3, 3))
    for p, q in zip(model.parameters(), expected):
        assert torch.equal(p, q)
