"""``stochopt bench calibrate``: set each workload's validation target as AlgoPerf sets its targets (Dahl et al.,
2023, section 4.4): tune the baselines (NAdamW, AdamW, heavy-ball, Nesterov) by quasirandom search over their
search spaces for the full step budget without stopping early; each study keeps its best trial's best validation
metric; each baseline gets the median over studies; the target is the best of the baselines' medians."""

from __future__ import annotations

import datetime
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from stochopt.bench.algorithms import BASELINES, load_algorithm
from stochopt.bench.rulesets import ProgressSink, run_studies
from stochopt.bench.scoring import median_over_studies
from stochopt.bench.storage import TrialRecord, load_records, open_storage
from stochopt.bench.suite import DEFAULT_STORAGE, first_trials, load_workloads, plan


def targets_path() -> Path:
    """The targets file that ships with the workloads (``stochopt/bench/workloads/targets.json``)."""
    return Path(__file__).parent / "workloads" / "targets.json"


def targets_from(records: Sequence[TrialRecord]) -> dict[str, tuple[float, str]]:
    """workload -> (target, best baseline): min over baselines of the median over studies of the best trial."""
    best: dict[tuple[str, str, int], float] = defaultdict(lambda: math.inf)
    for r in records:
        key = (r.workload, r.algorithm, r.study)
        best[key] = min(best[key], float(r.result["best_metric"]))
    per_baseline: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (workload, algorithm, _), value in best.items():
        per_baseline[workload][algorithm].append(value)
    out = {}
    for workload, baselines in per_baseline.items():
        medians = {a: median_over_studies(v) for a, v in baselines.items()}
        winner = min(medians, key=medians.get)
        out[workload] = (medians[winner], winner)
    return out


class CalibrationFailed(RuntimeError):
    """No baseline reached a finite validation metric on a workload, so it has no target to set."""


def calibrate(
    workloads: Sequence[str], trials: int = 5, studies: int = 3, seed: int = 0, storage: str = DEFAULT_STORAGE,
    jobs: int = 1, progress: ProgressSink | None = None, output: str | Path | None = None,
) -> dict[str, dict[str, object]]:  # fmt: skip
    """Run (or resume) the calibration and merge the new targets into ``output`` (default: the shipped file)."""
    loaded = load_workloads(workloads)
    specs = plan(loaded, [load_algorithm(b) for b in BASELINES], "calibrate", trials, studies, seed)
    db = open_storage(storage)
    run_studies(specs, db, jobs, progress)
    found = targets_from(first_trials(load_records(db, names=[s.name for s in specs]), specs))
    today = datetime.date.today().isoformat()
    path = Path(output) if output else targets_path()
    targets = json.loads(path.read_text()) if path.exists() else {}
    for spec, workload in loaded.items():
        if spec not in found or not math.isfinite(found[spec][0]):
            raise CalibrationFailed(
                f"calibration of {spec!r} produced no finite validation metric: every baseline trial failed or "
                f"diverged (their reasons are printed above and kept in {storage}); no target was written"
            )
        value, winner = found[spec]
        targets[workload.name] = {
            "target": value,
            "source": f"stochopt bench calibrate --trials {trials} --studies {studies} --seed {seed} ({today}): "
            f"median over {studies} studies of the best of {trials} trials of the best baseline, {winner}, "
            f"in {workload.max_steps} steps",
        }  # fmt: skip
    path.write_text(json.dumps(targets, indent=2) + "\n")
    return {loaded[s].name: targets[loaded[s].name] for s in loaded}
