"""Stochastic weight averaging and an exponential moving average of the weights, side by side.

A small MLP with batch norm learns a noisy nonlinear regression on synthetic data with SGD + momentum and a
cosine schedule. For the last quarter of training, ``SWA`` takes the lr over (a constant ``swa_lr``, the
paper's recipe) and averages the weights every 10 steps; ``EMA`` follows the weights throughout. At the end
both averaged models get batch-norm statistics recomputed for their own weights (``finalize``), and the
test loss of the plain, SWA and EMA models is printed.

Run: ``python examples/swa_ema.py`` (a few seconds on a 2-core CPU).
"""

from __future__ import annotations

import torch
from torch import nn

from stochopt.training import EMA, SWA

EPOCHS, BATCH, SWA_START_EPOCH = 20, 64, 15


def make_data(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 16, generator=gen)
    y = torch.sin(x[:, :4].sum(1, keepdim=True)) + 0.5 * x[:, 4:5] * x[:, 5:6]
    return x, y + 0.3 * torch.randn(n, 1, generator=gen)


def batches(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(x), generator=gen)
    return [(x[i], y[i]) for i in order.split(BATCH)]


@torch.no_grad()
def test_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return nn.functional.mse_loss(model(x), y).item()


def main() -> None:
    torch.set_num_threads(1)  # matrices this small run faster without OpenMP's fork/join, most of all on a busy CPU
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x_train, y_train = make_data(4000, gen)
    x_test, y_test = make_data(2000, gen)
    model = nn.Sequential(
        nn.Linear(16, 128), nn.BatchNorm1d(128), nn.ReLU(),
        nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(),
        nn.Linear(128, 1),
    )  # fmt: skip
    steps_per_epoch = -(-len(x_train) // BATCH)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS * steps_per_epoch)
    # SWA steps the cosine schedule until it starts, then holds the lr at swa_lr
    swa = SWA(model, opt, start=SWA_START_EPOCH * steps_per_epoch, every=10, swa_lr=0.02, scheduler=cosine)
    ema = EMA(model, decay=0.995)

    for epoch in range(EPOCHS):
        model.train()
        for x, y in batches(x_train, y_train, gen):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            swa.step()
            ema.step()
        if epoch % 5 == 4:
            lr, loss = opt.param_groups[0]["lr"], test_loss(model, x_test, y_test)
            print(f"epoch {epoch + 1:3d}  lr {lr:.4f}  test loss {loss:.4f}")

    train_batches = batches(x_train, y_train, gen)
    swa.finalize(train_batches)  # batch-norm statistics for the averaged weights
    ema.finalize(train_batches)
    print(f"averaged {swa.model.n_averaged.item()} snapshots (SWA), {ema.model.n_averaged.item()} steps (EMA)")
    for name, m in (("plain", model), ("SWA", swa.model), ("EMA", ema.model)):
        print(f"{name:>5} test loss {test_loss(m, x_test, y_test):.4f}")


if __name__ == "__main__":
    main()
