"""Image workloads on scikit-learn's bundled 8x8 digits (the seeds' Fashion-MNIST example in miniature): an MLP and a
small CNN classifier and an MSE autoencoder. Given ``data_dir=``, the same workloads read real MNIST or
Fashion-MNIST from its IDX files (:func:`stochopt.data.mnist_idx`) instead."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from stochopt.bench.workloads.base import Batch, Workload
from stochopt.bench.workloads.common import seeded, shuffled_batches, stored_target
from stochopt.data import digits, mnist_idx


class _ImageWorkload(Workload):
    """Shared data handling: the digits (default) or the IDX files in ``data_dir``; images flattened in [0, 1].

    The stored target belongs to the digits. With ``data_dir`` pass ``target=`` (or calibrate one): a digits target
    on MNIST means little, so using it anyway gives a warning. Loss and metric are a classifier's unless overridden."""

    metric = "validation error rate"
    batch_size = 64

    def __init__(self, data_dir: str | os.PathLike | None = None, target: float | None = None) -> None:
        if data_dir is not None and not Path(data_dir).is_dir():
            raise ValueError(f"data_dir must be a directory holding MNIST-style IDX files, got {str(data_dir)!r}")
        self.data_dir = data_dir
        if target is not None:
            if not isinstance(target, (int, float)) or not math.isfinite(target):
                raise ValueError(f"target must be a finite number, got {target!r}")
            self.target = float(target)
        elif data_dir is not None:
            warnings.warn(
                f"{self.name}: the stored target {self.target} was set on the 8x8 digits, not on the IDX data in "
                f"{str(data_dir)!r}; pass target= to set one for it",
                stacklevel=2,
            )

    def setup(self) -> None:
        train, val = digits() if self.data_dir is None else mnist_idx(self.data_dir)
        self.x_train, self.y_train = train.tensors
        self.x_val, self.y_val = val.tensors
        self.features = self.x_train.shape[1]
        self.side = math.isqrt(self.features)  # square images: 8 for the digits, 28 for MNIST
        self.classes = int(torch.cat([self.y_train, self.y_val]).max()) + 1

    def train_batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        return shuffled_batches((self.x_train, self.y_train), batch_size, seed)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def evaluate(self, model: nn.Module) -> float:
        return float((model(self.x_val).argmax(-1) != self.y_val).float().mean())


class DigitsMLP(_ImageWorkload):
    """A two-hidden-layer ReLU MLP classifier; the metric is the validation error rate."""

    name = "digits_mlp"
    target = stored_target("digits_mlp")
    max_steps = 1500
    eval_every = 50
    description = "MLP (2 x 128 ReLU) on the 8x8 digits, or on MNIST/Fashion-MNIST IDX files with data_dir="

    def init_model(self, seed: int, sparse: bool = False) -> nn.Module:
        with seeded(seed):
            return nn.Sequential(
                nn.Linear(self.features, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, self.classes)
            )


class DigitsCNN(_ImageWorkload):
    """A small CNN (three 3x3 convolutions, one max-pool, global average pooling, a linear head); validation error."""

    name = "digits_cnn"
    target = stored_target("digits_cnn")
    max_steps = 600
    eval_every = 30
    description = "small CNN (3 conv layers, global pooling) on the 8x8 digits, or on MNIST IDX files"

    def init_model(self, seed: int, sparse: bool = False) -> nn.Module:
        with seeded(seed):
            return nn.Sequential(
                nn.Unflatten(1, (1, self.side, self.side)),
                nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                nn.Linear(64, self.classes),
            )  # fmt: skip


class Autoencoder(_ImageWorkload):
    r"""An MLP autoencoder through a 12-number code, sigmoid output; loss and metric the mean squared error
    :math:`\frac1{nd}\sum_i \lVert \hat x_i - x_i \rVert^2` (validation set for the metric)."""

    name = "autoencoder"
    metric = "validation MSE"
    target = stored_target("autoencoder")
    max_steps = 1500
    eval_every = 50
    description = "MSE autoencoder (64-12-64 hidden, 12-number code) on the 8x8 digits, or on MNIST IDX files"

    def init_model(self, seed: int, sparse: bool = False) -> nn.Module:
        with seeded(seed):
            return nn.Sequential(
                nn.Linear(self.features, 64), nn.ReLU(), nn.Linear(64, 12),
                nn.ReLU(), nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, self.features), nn.Sigmoid(),
            )  # fmt: skip

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, _ = batch
        return F.mse_loss(model(x), x)

    def evaluate(self, model: nn.Module) -> float:
        return float(F.mse_loss(model(self.x_val), self.x_val))
