"""One trial: one training run of one algorithm on one workload with one seed, timed to the validation target.

The clock runs over everything a training algorithm pays for (building the optimizer and schedule, batches,
forward, backward, clipping, the optimizer step, the first steps' compilation) and stops during evaluation, as
AlgoPerf's submission time does (Dahl et al., 2023, section 4). A non-finite loss or metric ends the run as
failed: an infinite time, not a crash; so does an exception raised by the trial (the optimizer, the model, the
workload's loss or evaluation), recorded with its type, message and traceback.

An optimizer with ``train()`` and ``eval()`` methods (Schedule-Free, and any optimizer with that convention) is
put in train mode once it is built, switched to ``eval()`` before each evaluation, so that the evaluated weights
are its evaluation weights, and back to ``train()`` after; the switches are evaluation time, not training time.
"""

from __future__ import annotations

import functools
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from stochopt.bench.algorithms import Algorithm, build_optimizer
from stochopt.bench.workloads.base import Workload
from stochopt.optim import SGD
from stochopt.training.schedules import WarmupDecayLR, WarmupStableDecayLR

#: ``progress(step, max_steps)``, called every few steps and at each evaluation
Progress = Callable[[int, int], None]


@dataclass
class TrialResult:
    """``curve``: ``(step, training seconds, validation metric)`` at each evaluation, step 0 included.
    Times and steps to target are ``inf`` when the target was missed or the run failed; ``reason`` says why it
    failed, ``traceback`` holds the exception's traceback when the trial raised."""

    seconds_to_target: float
    steps_to_target: float
    best_metric: float
    steps: int
    train_seconds: float
    eval_seconds: float
    failed: bool = False
    reason: str = ""
    target: float | None = None
    curve: list[tuple[int, float, float]] = field(default_factory=list)
    traceback: str = ""

    @property
    def reached(self) -> bool:
        return math.isfinite(self.seconds_to_target)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@functools.cache
def warm_up() -> None:
    """Pay once per process what no algorithm should be charged for: the first optimizer built in a process
    imports torch's compiler stack (``add_param_group`` is wrapped by ``torch._disable_dynamo``; about 2 s), which
    would otherwise land on whichever algorithm happens to run first."""
    for cls in (torch.optim.SGD, SGD):
        param = torch.zeros(1, requires_grad=True)
        param.grad = torch.ones(1)
        cls([param], lr=0.1).step()


def failed_result(reason: str, target: float | None = None, steps: int = 0) -> TrialResult:
    """A trial that produced nothing to measure (its process died): failed, infinite time."""
    inf = math.inf
    return TrialResult(inf, inf, inf, steps, 0.0, 0.0, failed=True, reason=reason, target=target)


def describe_exception(err: BaseException, step: int, limit: int = 2000) -> tuple[str, str]:
    """``(reason, traceback)`` of an exception raised at ``step`` (0: while setting up or at the first evaluation)."""
    message = " ".join(str(err).split()) or "(no message)"
    if len(message) > limit:
        message = message[:limit] + "..."
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    return f"raised {type(err).__qualname__} at step {step}: {message}", text[-20_000:]


def _mode_switches(optimizer: torch.optim.Optimizer) -> tuple[Callable[[], Any], Callable[[], Any]] | None:
    """``(train, eval)`` of an optimizer that has both (Schedule-Free's convention), else None."""
    train, evaluate = getattr(optimizer, "train", None), getattr(optimizer, "eval", None)
    return (train, evaluate) if callable(train) and callable(evaluate) else None


def _scheduler(algorithm: Algorithm, optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int):
    if algorithm.decay == "constant":
        return WarmupStableDecayLR(optimizer, warmup_steps, max_steps, 0)
    return WarmupDecayLR(optimizer, warmup_steps, max_steps, algorithm.decay, algorithm.final_lr_ratio)


def run_trial(
    workload: Workload, algorithm: Algorithm, point: dict[str, Any], seed: int, max_steps: int,
    target: float | None = None, progress: Progress | None = None,
) -> TrialResult:  # fmt: skip
    """Train from a fresh model until ``workload.evaluate`` <= ``target`` or ``max_steps``; ``target=None`` never
    stops early (calibration). ``workload.setup()`` must have run. Same seed, same curve (on the CPU)."""
    warm_up()
    curve: list[tuple[int, float, float]] = []
    train_seconds, eval_seconds = 0.0, 0.0
    best = math.inf
    step = 0

    def result(reached: bool, reason: str = "", trace: str = "") -> TrialResult:
        inf = math.inf
        return TrialResult(
            seconds_to_target=train_seconds if reached else inf, steps_to_target=step if reached else inf,
            best_metric=best, steps=step, train_seconds=train_seconds, eval_seconds=eval_seconds,
            failed=bool(reason), reason=reason, target=target, curve=curve, traceback=trace,
        )  # fmt: skip

    def train() -> TrialResult:
        nonlocal train_seconds, eval_seconds, best, step
        torch.manual_seed(seed)
        model = workload.init_model(seed, sparse=algorithm.sparse_gradients)
        start = time.perf_counter()  # the algorithm's own set-up is part of its time
        optimizer = build_optimizer(algorithm, model, point, max_steps)
        modes = _mode_switches(optimizer)
        if modes is not None:
            modes[0]()  # train mode before the first step
        warmup_steps = min(round(float(point.get("warmup_fraction", 0.0)) * max_steps), max_steps)
        scheduler = _scheduler(algorithm, optimizer, warmup_steps, max_steps)
        clip_norm = point.get("clip_norm")
        batches = workload.train_batches(int(point.get("batch_size", workload.batch_size)), seed)
        report_every = max(1, max_steps // 50)
        train_seconds = time.perf_counter() - start

        def evaluate() -> float:
            nonlocal eval_seconds, best
            start = time.perf_counter()
            model.eval()
            if modes is not None:
                modes[1]()  # the optimizer's evaluation weights (Schedule-Free: its average x)
            with torch.no_grad():
                metric = float(workload.evaluate(model))
            if modes is not None:
                modes[0]()
            model.train()
            eval_seconds += time.perf_counter() - start
            curve.append((step, train_seconds, metric))
            best = min(best, metric) if math.isfinite(metric) else best
            return metric

        evaluate()
        model.train()
        for step in range(1, max_steps + 1):
            start = time.perf_counter()
            batch = next(batches)
            optimizer.zero_grad(set_to_none=True)
            loss = workload.loss(model, batch)
            if not torch.isfinite(loss.detach()).item():
                train_seconds += time.perf_counter() - start
                return result(False, f"non-finite training loss {loss.item()} at step {step}")
            loss.backward()
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(clip_norm))
            optimizer.step()  # nothing after it reads p.grad: some optimizers drop it (heavyball)
            scheduler.step()
            workload.after_step(model)
            train_seconds += time.perf_counter() - start
            if step % workload.eval_every == 0 or step == max_steps:
                metric = evaluate()
                if not math.isfinite(metric):
                    return result(False, f"non-finite validation metric {metric} at step {step}")
                if target is not None and metric <= target:
                    return result(True)
            if progress is not None and (step % report_every == 0 or step == max_steps):
                progress(step, max_steps)
        return result(False)

    try:
        return train()
    except Exception as err:  # the trial's failure, not the benchmark's: recorded, and the run goes on
        reason, trace = describe_exception(err, step)
        return result(False, reason, trace)
