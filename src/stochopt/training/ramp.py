r"""Batch-size ramps: train with small batches first and larger ones later (Smith et al., 2018, "Don't Decay
the Learning Rate, Increase the Batch Size"; the batch-size warmup of GPT-3, Brown et al., 2020).

A :class:`BatchSizeRamp` maps the step count to a batch size; :meth:`BatchSizeRamp.batch_sampler` turns a
sampler into a ``batch_sampler`` for ``torch.utils.data.DataLoader`` that follows it; and
:meth:`BatchSizeRamp.lr_scale` is the matching learning-rate multiplier (linear rule, Goyal et al., 2017, or
square-root rule, Krizhevsky, 2014), to hand to a schedule's ``multiplier`` or to ``LambdaLR``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Any

from torch.utils.data import Sampler

from stochopt.engine import checks

MODES = ("linear", "step")
UNITS = ("steps", "examples")
LR_RULES = {None: 0.0, "linear": 1.0, "sqrt": 0.5}


class BatchSizeRamp:
    r"""Batch size :math:`b` as a function of progress :math:`x = \min(u / U, 1)`, where :math:`u` counts steps
    (``unit="steps"``) or examples seen (``unit="examples"``) and :math:`U` = ``duration``:

    - ``mode="linear"``: :math:`b = b_0 + (b_1 - b_0)\,x`;
    - ``mode="step"``: ``stages`` geometric stages, :math:`b = b_0 (b_1/b_0)^{\lfloor x S \rfloor / S}`
      (32 to 512 in 4 stages: 32, 64, 128, 256, 512);

    rounded down to a multiple of ``multiple_of`` and kept within [``start``, ``end``]. The examples seen
    before step :math:`t` are the sum of the batch sizes of steps :math:`0 .. t-1` (every batch of
    :meth:`batch_sampler` is full). ``lr_rule`` scales the learning rate by :math:`(b / b_0)^p` with
    :math:`p` = 1 (``"linear"``) or 1/2 (``"sqrt"``): the rate a user passes is the rate for ``start``.
    """

    def __init__(
        self, start: int, end: int, duration: int, *, mode: str = "linear", unit: str = "steps", stages: int = 4,
        multiple_of: int = 1, lr_rule: str | None = None,
    ) -> None:  # fmt: skip
        self.start = checks.count("start", start, 1)
        self.end = checks.count("end", end, 1)
        self.duration = checks.count("duration", duration, 1)
        for name, value, allowed in (("mode", mode, MODES), ("unit", unit, UNITS), ("lr_rule", lr_rule, LR_RULES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")
        self.mode, self.unit, self.lr_rule = mode, unit, lr_rule
        self.stages = checks.count("stages", stages, 1)
        self.multiple_of = checks.count("multiple_of", multiple_of, 1)
        self._sizes: list[int] = []  # batch size of each step, filled on demand while the ramp lasts
        self._examples = 0  # examples seen before step len(self._sizes)

    def __repr__(self) -> str:
        return (
            f"BatchSizeRamp(start={self.start}, end={self.end}, duration={self.duration}, mode={self.mode!r}, "
            f"unit={self.unit!r}, stages={self.stages}, multiple_of={self.multiple_of}, lr_rule={self.lr_rule!r})"
        )

    def size_at(self, progress: float) -> int:
        """The batch size at ``progress`` in [0, 1] of the ramp."""
        x = min(max(progress, 0.0), 1.0)
        if self.mode == "linear":
            size = self.start + (self.end - self.start) * x
        else:
            size = self.start * (self.end / self.start) ** (math.floor(x * self.stages) / self.stages)
        # the 1e-9 keeps a float like 63.99999999 (a product of the geometric powers) at 64
        size = math.floor(size + 1e-9) // self.multiple_of * self.multiple_of
        low, high = sorted((self.start, self.end))
        return int(min(max(size, low), high))

    def batch_size(self, step: int) -> int:
        """The batch size of step ``step`` (0-based)."""
        step = checks.count("step", step, 0)
        if self.unit == "steps":
            return self.size_at(step / self.duration)
        while len(self._sizes) <= step:
            if self._examples >= self.duration:
                return self.end  # past the ramp: nothing more to record
            size = self.size_at(self._examples / self.duration)
            self._sizes.append(size)
            self._examples += size
        return self._sizes[step]

    def examples_before(self, step: int) -> int:
        """Examples seen in steps 0 .. step - 1."""
        return sum(self.batch_size(t) for t in range(checks.count("step", step, 0)))

    def lr_scale(self, step: int) -> float:
        """The learning-rate multiplier at ``step``: :math:`(b_t / b_0)^p` by ``lr_rule`` (1 without one)."""
        return (self.batch_size(step) / self.start) ** LR_RULES[self.lr_rule]

    def batch_sampler(self, sampler: Sampler | Sized, start_step: int = 0) -> RampBatchSampler:
        """A ``batch_sampler`` for DataLoader that draws this ramp's batch sizes from ``sampler``."""
        return RampBatchSampler(sampler, self, start_step)


class RampBatchSampler(Sampler[list[int]]):
    """Yields lists of indices from ``sampler`` with the ramp's batch size at each step.

    Steps count across epochs (``self.step``); an epoch is one pass over ``sampler`` and its incomplete last
    batch is dropped, so every batch has exactly the ramp's size. To resume, save :meth:`state_dict` from the
    training loop (a DataLoader with workers draws a few batches ahead, so the step to save is the training
    loop's own count: ``{"step": optimizer_steps}``).
    """

    def __init__(self, sampler: Sampler | Sized, ramp: BatchSizeRamp, start_step: int = 0) -> None:
        if not isinstance(ramp, BatchSizeRamp):
            raise TypeError(f"ramp must be a BatchSizeRamp, got {type(ramp).__name__}")
        if not hasattr(sampler, "__iter__") or not hasattr(sampler, "__len__"):
            raise TypeError(f"sampler must be a sized iterable of indices, got {type(sampler).__name__}")
        self.sampler, self.ramp = sampler, ramp
        self.step = checks.count("start_step", start_step, 0)

    def __iter__(self) -> Iterator[list[int]]:
        batch: list[int] = []
        for index in self.sampler:
            batch.append(int(index))
            if len(batch) == self.ramp.batch_size(self.step):
                self.step += 1
                yield batch
                batch = []

    def __len__(self) -> int:
        """Batches in the next epoch from the current step."""
        remaining, step = len(self.sampler), self.step
        while remaining >= self.ramp.batch_size(step):
            remaining -= self.ramp.batch_size(step)
            step += 1
        return step - self.step

    def state_dict(self) -> dict[str, Any]:
        """The step the ramp has reached: a resumed sampler continues with the batch size of that step."""
        return {"step": self.step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = checks.count("step", state_dict["step"], 0)
