r"""Scoring as AlgoPerf scores (Dahl et al., 2023, arXiv:2306.07179, section 4.5): pure functions over tables.

A *table* maps workload -> algorithm -> time to target (seconds or steps); ``math.inf`` means the target was
missed. For workload :math:`w` and algorithm :math:`a` the performance ratio is

.. math:: r_{w,a} = t_{w,a} / \min_b t_{w,b},

set to :math:`\infty` when the target was missed or :math:`r_{w,a} > \tau_{max} = 4`. The performance profile of
:math:`a` is the fraction of workloads it trains within a factor :math:`\tau` of the fastest,

.. math:: \rho_a(\tau) = \frac{1}{|W|}\, \big|\{w : r_{w,a} \le \tau\}\big|, \qquad \tau \in [1, \tau_{max}],

and the benchmark score is its normalized area, :math:`B_a = \frac{1}{\tau_{max} - 1}\int_1^{\tau_{max}}
\rho_a(\tau)\, d\tau` (1 = fastest on every workload, 0 = never within 4x). :math:`\rho_a` is a step function, so the
integral is exact: each workload adds :math:`(\tau_{max} - r_{w,a}) / (\tau_{max} - 1) / |W|`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

Table = dict[str, dict[str, float]]  # workload -> algorithm -> time to target (inf: missed)
TAU_MAX = 4.0


def study_time(trial_times: Iterable[float]) -> float:
    """External tuning: a study scores its fastest trial (inf when no trial reached the target)."""
    return min(trial_times, default=math.inf)


def median_over_studies(study_times: Sequence[float]) -> float:
    """The median over studies; with infinities counted as infinitely slow (so a majority of misses is a miss)."""
    # times are >= 0, so a middle pair with an infinity averages to infinity, as it should
    return statistics.median(study_times) if study_times else math.inf


def performance_ratios(table: Table, tau_max: float = TAU_MAX) -> Table:
    """workload -> algorithm -> t / best time on that workload; inf when missed or beyond ``tau_max``."""
    ratios: Table = {}
    for workload, times in table.items():
        finite = [t for t in times.values() if math.isfinite(t)]
        best = min(finite, default=math.inf)
        ratios[workload] = {}
        for algorithm, t in times.items():
            r = t / best if math.isfinite(t) and best > 0 else (1.0 if t == best == 0 else math.inf)
            ratios[workload][algorithm] = r if r <= tau_max else math.inf
    return ratios


def algorithms_of(table: Table) -> list[str]:
    """Every algorithm in the table, in first-seen order."""
    return list(dict.fromkeys(a for times in table.values() for a in times))


def performance_profile(ratios: Table, algorithm: str, taus: Sequence[float]) -> list[float]:
    """rho_a(tau) for each tau: the fraction of workloads with ratio <= tau (a workload lacking the algorithm is
    a miss)."""
    values = [ratios[w].get(algorithm, math.inf) for w in ratios]
    if not values:
        return [0.0 for _ in taus]
    return [sum(r <= tau for r in values) / len(values) for tau in taus]


def benchmark_score(ratios: Table, algorithm: str, tau_max: float = TAU_MAX) -> float:
    """Normalized area under rho_a on [1, tau_max], computed exactly from the step function."""
    values = [ratios[w].get(algorithm, math.inf) for w in ratios]
    if not values:
        return 0.0
    area = sum(tau_max - max(r, 1.0) for r in values if r <= tau_max)
    return area / (tau_max - 1.0) / len(values)


def speedup(table: Table, algorithm: str, baseline: str = "nadamw") -> tuple[float, int]:
    """Geometric mean over workloads of t_baseline / t_algorithm (> 1: faster than the baseline), over the
    workloads where both reached the target; returns (speed-up, number of such workloads), (nan, 0) if none."""
    logs = [
        math.log(times[baseline] / times[algorithm])
        for times in table.values()
        if math.isfinite(times.get(baseline, math.inf)) and math.isfinite(times.get(algorithm, math.inf))
        and times[algorithm] > 0 and times[baseline] > 0
    ]  # fmt: skip
    if not logs:
        return math.nan, 0
    return math.exp(sum(logs) / len(logs)), len(logs)


StudyTable = dict[str, dict[str, list[float]]]  # workload -> algorithm -> each study's time, in study order


def spread(values: Sequence[float]) -> tuple[float, float]:
    """(min, max) over studies; (inf, inf) for none."""
    return (min(values), max(values)) if values else (math.inf, math.inf)


def study_speedups(studies: StudyTable, algorithm: str, baseline: str = "nadamw") -> list[float]:
    """One speed-up per study index, paired: study i of ``algorithm`` against study i of ``baseline`` (the same
    trial seeds), each the geometric mean over the workloads both reached in that study; studies where they
    reached none together are left out. Their min-max is the spread of :func:`speedup` over studies."""
    count = max((len(times.get(a, [])) for times in studies.values() for a in (algorithm, baseline)), default=0)
    gains = []
    for i in range(count):
        paired = {
            w: {a: times[a][i] for a in (algorithm, baseline)}
            for w, times in studies.items()
            if all(len(times.get(a, [])) > i for a in (algorithm, baseline))
        }  # fmt: skip
        gain, n = speedup(paired, algorithm, baseline)
        if n:
            gains.append(gain)
    return gains


def within_noise(a: Sequence[float], b: Sequence[float]) -> bool:
    """Two cells' study times overlap (min-max ranges intersect, both finite): the ranking between them is not
    settled by these studies."""
    (lo_a, hi_a), (lo_b, hi_b) = spread(a), spread(b)
    return math.isfinite(hi_a) and math.isfinite(hi_b) and lo_a <= hi_b and lo_b <= hi_a


def relative_step_cost(costs: Table, algorithm: str, baseline: str = "nadamw") -> tuple[float, int]:
    """Geometric mean over workloads of (seconds per step of ``algorithm``) / (that of ``baseline``): what one of
    its steps costs relative to the baseline's (> 1: dearer); returns (ratio, number of workloads)."""
    return speedup(costs, baseline, algorithm)  # the roles swapped: t_algorithm / t_baseline


def summary(table: Table, baseline: str = "nadamw", tau_max: float = TAU_MAX) -> dict[str, dict[str, float]]:
    """algorithm -> {"score", "speedup", "speedup_workloads", "reached"} for every algorithm of the table."""
    ratios = performance_ratios(table, tau_max)
    out = {}
    for algorithm in algorithms_of(table):
        gain, count = speedup(table, algorithm, baseline) if any(baseline in t for t in table.values()) else (
            math.nan, 0)  # fmt: skip
        out[algorithm] = {
            "score": benchmark_score(ratios, algorithm, tau_max), "speedup": gain, "speedup_workloads": count,
            "reached": sum(math.isfinite(t.get(algorithm, math.inf)) for t in table.values()),
        }  # fmt: skip
    return out


__all__ = [
    "TAU_MAX", "StudyTable", "Table", "algorithms_of", "benchmark_score", "median_over_studies", "performance_profile",
    "performance_ratios", "relative_step_cost", "speedup", "spread", "study_speedups", "study_time", "summary",
    "within_noise",
]  # fmt: skip
