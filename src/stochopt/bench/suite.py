"""``stochopt bench``: plan the studies of a ruleset, run what is missing, and reduce the trials to tables."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from optuna.storages import RDBStorage

from stochopt.bench.algorithms import BASELINES, Algorithm, load_algorithm
from stochopt.bench.rulesets import RULESETS, SELF_TUNING_BUDGET, ProgressSink, StudySpec, run_studies
from stochopt.bench.scoring import StudyTable, Table, median_over_studies, study_time
from stochopt.bench.storage import TrialRecord, load_records, open_storage
from stochopt.bench.workloads.base import Workload

#: ``stochopt bench --quick``: the self-tuning ruleset (each algorithm's own defaults, no tuning: no luck of a
#: few quasirandom points in the answer) with three seeds each, so that every cell has a spread, on the three
#: digits workloads whose stored targets the defaults reach; the convex workloads' targets come from tuned
#: Nesterov and are out of reach of untuned defaults (measured: every algorithm missed them). About 2-3 minutes
#: on two cores (docs/benchmark.md has the measured run).
QUICK = {
    "workloads": ["digits_mlp", "autoencoder", "digits_cnn"],
    "algorithms": ["nadamw", "adamw", "heavy_ball", "lamb", "lion"],
    "ruleset": "self",
    "trials": 1,
    "studies": 3,
    "why": (
        "quick: the self-tuning ruleset (each algorithm's defaults, 3x the step budget) on digits_mlp, autoencoder "
        "and digits_cnn, 3 seeds each: a spread in every cell and no tuning luck; the full suite: stochopt bench"
    ),
}
DEFAULT_ALGORITHMS = ["nadamw", "adamw", "heavy_ball", "nesterov", "lion", "lamb", "adafactor"]
DEFAULT_STORAGE = "stochopt-bench.db"
UNITS = ("seconds", "steps")


def load_workloads(specs: Sequence[str], options: dict[str, Any] | None = None) -> dict[str, Workload]:
    """Each workload by name or import path (not set up yet: the runner does that once per process); a bad spec
    is one ValueError naming it (:func:`stochopt.bench.workloads.load_workload`)."""
    from stochopt.bench.workloads import load_workload

    return {spec: load_workload(spec, **(options or {})) for spec in specs}


def plan(
    workloads: dict[str, Workload], algorithms: Sequence[Algorithm], ruleset: str = "external", trials: int = 5,
    studies: int = 1, seed: int = 0, workload_options: dict[str, Any] | None = None,
) -> list[StudySpec]:  # fmt: skip
    """One study per (workload, algorithm, study index); self-tuning: 1 trial of the defaults, 3x the steps."""
    if ruleset not in RULESETS:
        raise ValueError(f"ruleset must be one of {', '.join(RULESETS)}, got {ruleset!r}")
    for name, value in (("trials", trials), ("studies", studies)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    specs = []
    for spec, workload in workloads.items():
        target = None if ruleset == "calibrate" else float(workload.target)
        budget = workload.max_steps * (SELF_TUNING_BUDGET if ruleset == "self" else 1)
        for algorithm in algorithms:
            for study in range(studies):
                specs.append(StudySpec(
                    ruleset, spec, algorithm, study, seed, 1 if ruleset == "self" else trials, budget, target,
                    workload.metric, dict(workload_options or {}),
                ))  # fmt: skip
    return specs


@dataclass
class BenchmarkResult:
    """The trials of one benchmark run and their reduction to time-to-target tables."""

    records: list[TrialRecord]
    ruleset: str
    workloads: list[str] = field(default_factory=list)
    algorithms: list[str] = field(default_factory=list)

    def studies(self, unit: str = "seconds") -> StudyTable:
        """workload -> algorithm -> each study's fastest trial (inf: missed), in (seed, study) order."""
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
        per_study: dict[tuple[str, str, int, int], list[float]] = defaultdict(list)
        for r in self.records:
            per_study[(r.workload, r.algorithm, r.seed, r.study)].append(r.seconds if unit == "seconds" else r.steps)
        found: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for (workload, algorithm, _, _), times in sorted(per_study.items()):
            found[workload][algorithm].append(study_time(times))
        return {w: {a: found[w].get(a, []) for a in self._algorithms(found)} for w in self.workloads or sorted(found)}

    def table(self, unit: str = "seconds") -> Table:
        """workload -> algorithm -> median over studies of the study's fastest trial (inf: missed)."""
        return {w: {a: median_over_studies(ts) for a, ts in times.items()} for w, times in self.studies(unit).items()}

    def step_costs(self) -> Table:
        """workload -> algorithm -> median over its trials of training seconds per step (what a step costs)."""
        costs: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in self.records:
            if r.result["steps"] > 0:
                costs[r.workload][r.algorithm].append(r.result["train_seconds"] / r.result["steps"])
        return {w: {a: statistics.median(costs[w][a]) if costs[w][a] else math.inf for a in self._algorithms(costs)}
                for w in self.workloads or sorted(costs)}  # fmt: skip

    def _algorithms(self, found: dict[str, dict[str, Any]]) -> list[str]:
        return self.algorithms or sorted({a for w in found.values() for a in w})


def run_benchmark(
    workloads: Sequence[str], algorithms: Sequence[str], ruleset: str = "external", trials: int = 5, studies: int = 1,
    storage: str | RDBStorage = DEFAULT_STORAGE, jobs: int = 1, seed: int = 0, progress: ProgressSink | None = None,
    workload_options: dict[str, Any] | None = None, stop_after: int | None = None,
) -> BenchmarkResult:  # fmt: skip
    """Run (or resume) a benchmark and return its trials. Everything the user named is checked first, so that a
    typo fails in a second with one message rather than after an hour of training. ``storage``: a file path, a
    SQLAlchemy URL, or an opened :func:`stochopt.bench.storage.open_storage` (e.g. with a short grace period)."""
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    loaded = load_workloads(workloads, workload_options)
    algos = [load_algorithm(a) for a in algorithms]
    specs = plan(loaded, algos, ruleset, trials, studies, seed, workload_options)
    db = open_storage(storage) if isinstance(storage, str) else storage
    run_studies(specs, db, jobs, progress, stop_after)
    return BenchmarkResult(first_trials(load_records(db, names=[s.name for s in specs]), specs), ruleset,
                           list(workloads), [a.name for a in algos])  # fmt: skip


def first_trials(records: list[TrialRecord], specs: list[StudySpec]) -> list[TrialRecord]:
    """Each study's first ``trials`` finished trials: a storage that holds more (an earlier run with a larger
    ``--trials``) must not give this run's studies more tries than it asked for."""
    limit = {(s.workload, s.algorithm.name, s.seed, s.study): s.trials for s in specs}
    kept, seen = [], defaultdict(int)
    for r in sorted(records, key=lambda r: r.trial):
        key = (r.workload, r.algorithm, r.seed, r.study)
        if seen[key] < limit.get(key, 0):
            seen[key] += 1
            kept.append(r)
    return kept


def load_result(storage: str = DEFAULT_STORAGE, ruleset: str = "external") -> BenchmarkResult:
    """Every finished trial of ``ruleset`` in the storage (for ``stochopt report``), with the baseline first."""
    records = load_records(open_storage(storage), ruleset=ruleset)
    if not records:
        raise ValueError(f"no finished {ruleset!r} trials in {storage!r}; run `stochopt bench` with this --storage")
    algorithms = sorted({r.algorithm for r in records}, key=lambda a: (a != BASELINES[0], a))
    return BenchmarkResult(records, ruleset, sorted({r.workload for r in records}), algorithms)
