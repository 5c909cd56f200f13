"""One trial: one training run of one algorithm on one workload with one seed, timed to the validation target.

The clock runs over everything a training algorithm pays for (building the optimizer and schedule, batches,
forward, backward, clipping, the optimizer step, the first steps' compilation) and stops during evaluation, as
AlgoPerf's submission time does (Dahl et al., 2023, section 4). A non-finite loss or metric ends the run as
failed: an infinite time, not a crash.
"""

from __future__ import annotations

import functools
import math
import time
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
    Times and steps to target are ``inf`` when the target was missed or the run failed."""

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
    torch.manual_seed(seed)
    model = workload.init_model(seed, sparse=algorithm.sparse_gradients)
    start = time.perf_counter()  # the algorithm's own set-up is part of its time
    optimizer = build_optimizer(algorithm, model, point)
    warmup_steps = min(round(float(point.get("warmup_fraction", 0.0)) * max_steps), max_steps)
    scheduler = _scheduler(algorithm, optimizer, warmup_steps, max_steps)
    clip_norm = point.get("clip_norm")
    batches = workload.train_batches(int(point.get("batch_size", workload.batch_size)), seed)
    report_every = max(1, max_steps // 50)

    curve: list[tuple[int, float, float]] = []
    train_seconds, eval_seconds = time.perf_counter() - start, 0.0
    best = math.inf

    def evaluate(step: int) -> float:
        nonlocal eval_seconds, best
        start = time.perf_counter()
        model.eval()
        with torch.no_grad():
            metric = float(workload.evaluate(model))
        model.train()
        eval_seconds += time.perf_counter() - start
        curve.append((step, train_seconds, metric))
        best = min(best, metric) if math.isfinite(metric) else best
        return metric

    def result(step: int, reached: bool, reason: str = "") -> TrialResult:
        inf = math.inf
        return TrialResult(
            seconds_to_target=train_seconds if reached else inf, steps_to_target=step if reached else inf,
            best_metric=best, steps=step, train_seconds=train_seconds, eval_seconds=eval_seconds,
            failed=bool(reason), reason=reason, target=target, curve=curve,
        )  # fmt: skip

    evaluate(0)
    model.train()
    for step in range(1, max_steps + 1):
        start = time.perf_counter()
        batch = next(batches)
        optimizer.zero_grad(set_to_none=True)
        loss = workload.loss(model, batch)
        if not torch.isfinite(loss.detach()).item():
            train_seconds += time.perf_counter() - start
            return result(step, False, f"non-finite training loss {loss.item()} at step {step}")
        loss.backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(clip_norm))
        optimizer.step()
        scheduler.step()
        workload.after_step(model)
        train_seconds += time.perf_counter() - start
        if step % workload.eval_every == 0 or step == max_steps:
            metric = evaluate(step)
            if not math.isfinite(metric):
                return result(step, False, f"non-finite validation metric {metric} at step {step}")
            if target is not None and metric <= target:
                return result(step, True)
        if progress is not None and (step % report_every == 0 or step == max_steps):
            progress(step, max_steps)
    return result(max_steps, False)
