"""Test doubles for the benchmark's failure rules and the optimizer train/eval convention, by import path:
``faulty:Faulty`` (a workload whose chosen trials raise or kill their process) and ``faulty:TrainEvalSGD`` with
``faulty:Recording`` (an optimizer with ``train()``/``eval()`` and a workload that log what the runner calls)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
from tiny_workloads import TinyRegression
from torch import nn


class Faulty(TinyRegression):
    """TinyRegression whose trials of some seeds fault at step ``at``. ``faults``: ``seed=kind*times`` items, comma
    separated, e.g. ``"0=kill*9,1=exit*1,2=raise*9"``: the trials of seed 0 kill their own process with SIGKILL, at
    most 9 times in all; seed 1 ends its process with ``os._exit(3)`` once; seed 2 raises a ValueError. The faults
    are counted in the folder ``ledger``, one file per fault (``<seed>-<n>``), so that every process of a benchmark
    shares the count and a test can read it."""

    name = "faulty"
    max_steps = 20

    def __init__(self, faults: str = "", at: int = 3, ledger: str = "") -> None:
        super().__init__()
        self.at, self.ledger = int(at), ledger
        self.faults: dict[int, tuple[str, int]] = {}
        for item in filter(None, faults.split(",")):
            seed, _, rest = item.partition("=")
            kind, _, times = rest.partition("*")
            self.faults[int(seed)] = (kind, int(times or 1))
        self.seed, self.step = -1, 0

    def init_model(self, seed: int, sparse: bool = False) -> nn.Module:
        self.seed, self.step = seed, 0
        return super().init_model(seed, sparse)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        self.step += 1
        if self.step == self.at and self.seed in self.faults and self._claim():
            kind = self.faults[self.seed][0]
            if kind == "raise":
                raise ValueError(f"injected fault | seed {self.seed} at step {self.step}")
            if kind == "exit":
                os._exit(3)
            os.kill(os.getpid(), signal.SIGKILL)
        return super().loss(model, batch)

    def _claim(self) -> bool:
        """Take one of this seed's faults; False once they are all used."""
        for n in range(self.faults[self.seed][1]):
            try:
                fd = os.open(os.path.join(self.ledger, f"{self.seed}-{n}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            return True
        return False


def faults_taken(ledger: str | Path, seed: int) -> int:
    return len(list(Path(ledger).glob(f"{seed}-*")))


#: what the runner called, in order: ("train",), ("eval", eval weights), ("step", weights it stepped from),
#: ("evaluate", weights the workload evaluated)
LOG: list[tuple] = []


def _weights(params) -> list[float]:
    return [float(x) for p in params for x in p.detach().flatten()]


class TrainEvalSGD(torch.optim.Optimizer):
    """SGD with Schedule-Free's convention: ``step()`` only in train mode; ``eval()`` swaps in evaluation weights
    (here the training weights plus 1000, easy to tell apart), ``train()`` swaps the training weights back."""

    def __init__(self, params, lr: float = 0.05) -> None:
        super().__init__(params, {"lr": lr})
        self.training = False
        self.saved: list[torch.Tensor] = []

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def eval(self) -> None:
        if self.training:
            self.saved = [p.detach().clone() for p in self._params()]
            for p in self._params():
                p.add_(1000.0)
            self.training = False
        LOG.append(("eval", _weights(self._params())))

    @torch.no_grad()
    def train(self) -> None:
        if not self.training and self.saved:
            for p, saved in zip(self._params(), self.saved):
                p.copy_(saved)
        self.training = True
        LOG.append(("train",))

    @torch.no_grad()
    def step(self, closure=None):
        if not self.training:
            raise RuntimeError("step() in eval mode")
        LOG.append(("step", _weights(self._params())))
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


class Recording(TinyRegression):
    """TinyRegression that logs the weights it evaluates."""

    name = "recording"

    def evaluate(self, model: nn.Module) -> float:
        LOG.append(("evaluate", _weights(model.parameters()), model.training))
        return super().evaluate(model)
