"""AlgoPerf-style benchmark: time to a validation target on small workloads, scored by performance profiles.

Layout (Dahl et al., 2023, arXiv:2306.07179, done small): ``workloads/`` (the unit of extension), ``algorithms``
and ``spaces/*.toml`` (algorithms and search spaces as data), ``runner`` (one timed trial), ``rulesets`` and
``storage`` (external tuning and self-tuning on Optuna), ``scoring`` (pure functions), ``report`` (plots and
tables), ``calibrate`` (targets), ``suite`` (``stochopt bench``). The names below load on first use, so that
importing a workload does not import Optuna or matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

from stochopt.extras import require

_EXPORTS = {
    "Algorithm": "algorithms", "load_algorithm": "algorithms", "resolve_optimizer": "algorithms",
    "shipped_algorithms": "algorithms", "TrialResult": "runner", "run_trial": "runner", "run_benchmark": "suite",
    "load_result": "suite", "BenchmarkResult": "suite", "QUICK": "suite", "calibrate": "calibrate",
    "write_report": "report", "open_storage": "storage", "performance_ratios": "scoring",
    "performance_profile": "scoring", "benchmark_score": "scoring", "speedup": "scoring",
}  # fmt: skip
__all__ = sorted(_EXPORTS)


#: the modules that import Optuna (the search and the trial storage), directly or through another
_ON_OPTUNA = {"suite", "calibrate", "report", "storage"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        if _EXPORTS[name] in _ON_OPTUNA:
            require("optuna", "scipy", feature=f"stochopt.bench.{name}")
        return getattr(importlib.import_module(f"stochopt.bench.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'stochopt.bench' has no attribute {name!r}")
