"""The unit of extension of the benchmark: a workload is a model, data, a loss, a validation metric and a target.

A user's workload subclasses :class:`Workload` and is passed by import path (``mypkg.module:MyWorkload``). The
runner owns everything else: the optimizer, its schedule, the clock, evaluation cadence and the time-to-target.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

Batch = Any  # whatever the workload's own ``loss`` accepts, usually a tuple of tensors


class Workload(ABC):
    """A training problem with a validation target; the metric is always *lower is better*.

    Class attributes every workload sets:

    - ``name``: short identifier used on the command line and in the results database;
    - ``metric``: what ``evaluate`` returns, e.g. ``"error rate"`` or ``"validation loss"``;
    - ``target``: the validation value to reach (set by ``stochopt bench calibrate``, stored with the workload);
    - ``max_steps``: step budget of one run (external tuning); self-tuning gets 3x;
    - ``eval_every``: evaluation cadence in steps;
    - ``batch_size``: default training batch size.

    Constructor keyword arguments are workload options (for example ``data_dir`` for real MNIST files).
    ``setup`` builds or loads the data once; everything after it is deterministic given the seed.
    """

    name: ClassVar[str]
    metric: ClassVar[str]
    target: ClassVar[float]
    max_steps: ClassVar[int]
    eval_every: ClassVar[int]
    batch_size: ClassVar[int]
    description: ClassVar[str] = ""

    @abstractmethod
    def setup(self) -> None:
        """Generate or load the data (no download); called once before any run."""

    @abstractmethod
    def init_model(self, seed: int, sparse: bool = False) -> nn.Module:
        """A freshly initialized model; ``sparse=True`` asks embedding tables for sparse gradients."""

    @abstractmethod
    def train_batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        """An endless, seeded stream of training batches."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean training loss of ``model`` on ``batch`` (a 0-d tensor with a graph)."""

    @abstractmethod
    def evaluate(self, model: nn.Module) -> float:
        """The validation metric (lower is better) on the full validation set; called under ``torch.no_grad``."""

    def after_step(self, model: nn.Module) -> None:  # noqa: B027 (optional hook: doing nothing is the default)
        """Hook run after each optimizer step, e.g. the projection of a constrained online problem."""
