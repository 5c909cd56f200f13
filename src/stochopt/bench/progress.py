"""Progress on the terminal with rich: one bar per running trial, and an overall bar with the ETA."""

from __future__ import annotations

import math
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from stochopt.bench.rulesets import ProgressSink
from stochopt.bench.runner import TrialResult


def describe(result: TrialResult) -> str:
    """One line: time and steps to target, or why the target was missed."""
    if result.reached:
        return f"target in {result.seconds_to_target:.2f} s, {int(result.steps_to_target)} steps"
    if result.failed:
        return f"failed: {result.reason}"
    best = f"{result.best_metric:.4g}" if math.isfinite(result.best_metric) else "none"
    missed = "" if result.target is None else f", target {result.target:.4g} missed"
    return f"best {best} in {result.steps} steps{missed}"


class RichProgress(ProgressSink):
    """Use as a context manager around :func:`stochopt.bench.rulesets.run_studies`."""

    def __init__(self, console: Console | None = None) -> None:
        # piped: one line per trial, not wrapped at 80 columns
        self.console = console or Console(stderr=True, width=None if sys.stderr.isatty() else 160)
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("ETA"), TimeRemainingColumn(), console=self.console, transient=False,
        )  # fmt: skip
        self.tasks: dict[str, int] = {}
        self.overall: int | None = None

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def plan(self, total: int, done: int) -> None:
        if done:
            self.console.print(f"resuming: {done} of {total} trials already in the storage")
        self.overall = self.progress.add_task("[bold]all trials", total=total, completed=done)

    def start(self, key: str, description: str, max_steps: int) -> None:
        self.tasks[key] = self.progress.add_task(f"  {description}", total=max_steps)

    def advance(self, key: str, step: int) -> None:
        if key in self.tasks:
            self.progress.update(self.tasks[key], completed=step)

    def retry(self, key: str, description: str, reason: str) -> None:
        if key in self.tasks:  # its bar starts again from step 0
            self.progress.update(self.tasks[key], completed=0)
        self.progress.console.print(f"{description}: {reason}", markup=False)

    def finish(self, key: str, description: str, result: TrialResult) -> None:
        if key in self.tasks:
            self.progress.remove_task(self.tasks.pop(key))
        self.progress.console.print(f"{description}: {describe(result)}", markup=False)
        if self.overall is not None:
            self.progress.advance(self.overall)
