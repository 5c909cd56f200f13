"""A workload for the test that kills a ``stochopt bench`` process in the middle of a trial: it stalls there, on
purpose, in the one process that is told to."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from tiny_workloads import TinyRegression
from torch import nn

#: a path: the process whose environment names it stalls in the middle of its second trial, after creating it
STALL_ENV = "STOCHOPT_TEST_STALL"


class StallOnce(TinyRegression):
    """TinyRegression that runs its whole 40-step budget (the target is never reached), 5 ms a step; in the process
    whose ``STOCHOPT_TEST_STALL`` names a file, it creates that file at step 20 of its second trial and then sleeps
    (its heartbeats go on) until it is killed."""

    name = "stall_once"
    target = 0.0
    max_steps = 40
    trials = 0  # trials started in this process
    steps = 0  # training steps of the current trial

    def init_model(self, seed: int, sparse: bool = False) -> nn.Module:
        type(self).trials += 1
        type(self).steps = 0
        return super().init_model(seed, sparse)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        type(self).steps += 1
        marker = os.environ.get(STALL_ENV)
        if marker and type(self).trials == 2 and type(self).steps == self.max_steps // 2:
            Path(marker).touch()
            time.sleep(600)
        time.sleep(0.005)
        return super().loss(model, batch)
