"""The tuning rulesets of AlgoPerf (Dahl et al., 2023, section 4.3), with Optuna doing the search and the books.

- **external tuning**: per (workload, algorithm), ``studies`` independent studies of ``trials`` trials each; the
  trials of a study sample the algorithm's search space with Optuna's ``QMCSampler`` (scrambled Sobol, seeded per
  study); a study scores its fastest trial, the workload the median over studies.
- **self-tuning**: the algorithm's defaults only, 3x the step budget, one trial per study.
- **calibrate**: external tuning of the baselines without early stopping, to set targets (:mod:`.calibrate`).

Note that Optuna's QMCSampler draws a study's very first trial with its (seeded) independent sampler to learn the
search space; the later trials follow the Sobol sequence.

``jobs > 1`` runs trials in that many spawned processes; only this process writes to the storage. Several
``stochopt bench`` processes (or machines, with a PostgreSQL URL) can share one storage: each asks Optuna for the
next trial, so none is run twice. Timings are wall-clock: parallel jobs on a loaded machine slow each other down.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from optuna.storages import RDBStorage, fail_stale_trials
from optuna.trial import TrialState

from stochopt.bench.algorithms import Algorithm
from stochopt.bench.runner import TrialResult, run_trial

RULESETS = ("external", "self", "calibrate")
SELF_TUNING_BUDGET = 3  # AlgoPerf: the self-tuning ruleset trains 3x longer than the external-tuning budget
HEARTBEAT_FALLBACK = 5  # seconds, for a storage opened without heartbeats


@dataclass(frozen=True)
class StudySpec:
    """One Optuna study: ``trials`` runs of ``algorithm`` on ``workload`` (a name or import path)."""

    ruleset: str
    workload: str
    algorithm: Algorithm
    study: int
    seed: int
    trials: int
    max_steps: int
    target: float | None
    metric: str
    workload_options: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.ruleset}/{self.workload}/{self.algorithm.name}/seed{self.seed}/study{self.study}"

    def trial_seed(self, number: int) -> int:
        """Each trial its own seed (data order and initialization), a function of where it stands."""
        return (self.seed * 1_000_003 + self.study * 10_007 + number) % 2**31

    def distributions(self) -> dict[str, BaseDistribution]:
        if self.ruleset in ("self",):
            return {}
        return {
            key: IntDistribution(int(r.low), int(r.high), log=r.log) if r.integer
            else FloatDistribution(r.low, r.high, log=r.log)
            for key, r in self.algorithm.search.items()
        }  # fmt: skip


class ProgressSink:
    """What the runner tells the user; :class:`stochopt.bench.progress.RichProgress` draws it."""

    def plan(self, total: int, done: int) -> None: ...
    def start(self, key: str, description: str, max_steps: int) -> None: ...
    def advance(self, key: str, step: int) -> None: ...
    def finish(self, key: str, description: str, result: TrialResult) -> None: ...


_WORKLOADS: dict[tuple[str, str], Any] = {}
_QUEUE: Any = None


def _workload(spec: str, options: dict[str, Any]):
    """Each process loads and sets up a workload once and reuses it for every later trial."""
    from stochopt.bench.workloads import load_workload

    key = (spec, repr(sorted(options.items())))
    if key not in _WORKLOADS:
        workload = load_workload(spec, **options)
        workload.setup()
        _WORKLOADS[key] = workload
    return _WORKLOADS[key]


def execute(task: dict[str, Any], progress: Callable[[int, int], None] | None = None) -> TrialResult:
    """Run one trial described by plain data (picklable: it crosses into worker processes)."""
    workload = _workload(task["workload"], task["workload_options"])
    if progress is None and _QUEUE is not None:
        key = task["key"]

        def progress(step: int, total: int) -> None:
            _QUEUE.put((key, step))

    return run_trial(workload, task["algorithm"], task["point"], task["seed"], task["max_steps"], task["target"],
                     progress)  # fmt: skip


def _init_worker(queue: Any) -> None:
    global _QUEUE
    _QUEUE = queue


def definition(spec: StudySpec) -> str:
    """What a study's trials depend on besides the seed: the target, the budget and the whole algorithm."""
    a = spec.algorithm
    return json.dumps([spec.target, spec.max_steps, a.optimizer, a.fixed, a.defaults, sorted(a.search.items()),
                       a.decay, a.final_lr_ratio, a.sparse_gradients, spec.workload_options], default=repr)  # fmt: skip


def create_study(storage: RDBStorage, spec: StudySpec) -> optuna.Study:
    """Create the study, or load it from an earlier run when it was defined the same way; trials measured against
    another target, budget or search space cannot be mixed in, so that is an error naming what changed."""
    sampler = optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=spec.seed * 1009 + spec.study,
                                         warn_independent_sampling=False)  # fmt: skip
    study = optuna.create_study(study_name=spec.name, storage=storage, sampler=sampler, load_if_exists=True,
                                direction="minimize")  # fmt: skip
    attrs = {"ruleset": spec.ruleset, "workload": spec.workload, "algorithm": spec.algorithm.name, "seed": spec.seed,
             "study": spec.study, "trials": spec.trials, "max_steps": spec.max_steps, "target": spec.target,
             "metric": spec.metric, "optimizer": spec.algorithm.optimizer, "definition": definition(spec)}  # fmt: skip
    stored = study.user_attrs.get("definition")
    if stored is None:
        for key, value in attrs.items():
            study.set_user_attr(key, value)
    elif stored != attrs["definition"]:
        raise ValueError(
            f"the storage already holds study {spec.name!r} defined differently (target, budget or search space "
            f"changed: stored {stored}, now {attrs['definition']}); use another --storage, or delete that one"
        )
    return study


def _count(study: optuna.Study, *states: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def fail_dead_trials(study: optuna.Study, storage: RDBStorage) -> None:
    """Fail and re-queue the trials a process created but died before its first heartbeat (killed inside
    ``study.ask``): Optuna's stale-trial check only sees trials that have a heartbeat. A live process sends its first
    heartbeat right after ``ask``, so a trial without one after the grace period is dead."""
    grace = storage.grace_period or 2 * (storage.get_heartbeat_interval() or HEARTBEAT_FALLBACK)
    now = datetime.datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = trial.datetime_start
        if "heartbeat" in trial.user_attrs or started is None or (now - started).total_seconds() < grace:
            continue
        try:
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process got there first
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


@dataclass
class _InFlight:
    spec: StudySpec
    study: optuna.Study
    trial: optuna.Trial
    description: str


def run_studies(
    specs: list[StudySpec], storage: RDBStorage, jobs: int = 1, progress: ProgressSink | None = None,
    stop_after: int | None = None,
) -> None:  # fmt: skip
    """Run every missing trial of ``specs`` (``jobs`` at a time), writing each result to ``storage`` as it ends.

    Finished trials are skipped; trials another process is running are waited for; trials of a dead process are
    re-queued (heartbeats). On an exception or Ctrl-C the trials in flight are marked failed and re-queued with the
    same hyperparameters, then the exception propagates: the next run resumes. ``stop_after`` raises
    ``KeyboardInterrupt`` after that many trials of this call (to test resuming)."""
    progress = progress or ProgressSink()
    studies = {spec.name: create_study(storage, spec) for spec in specs}
    total = sum(spec.trials for spec in specs)
    done = sum(min(_count(studies[s.name], TrialState.COMPLETE), s.trials) for s in specs)
    progress.plan(total, done)
    in_flight: dict[str, _InFlight] = {}
    futures: dict[Future, str] = {}
    finished_here = 0
    beating = threading.Event()
    pool = queue = None
    if jobs > 1:
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(queue,))

    def heartbeat() -> None:
        while not beating.wait(storage.get_heartbeat_interval() or HEARTBEAT_FALLBACK):
            for flight in list(in_flight.values()):
                storage.record_heartbeat(flight.trial._trial_id)

    saturated: set[str] = set()  # studies whose every trial is finished or running somewhere

    def next_trial() -> _InFlight | None:
        for spec in specs:
            if spec.name in saturated:
                continue
            study = studies[spec.name]
            if _count(study, TrialState.COMPLETE, TrialState.RUNNING) >= spec.trials:
                saturated.add(spec.name)
            else:
                trial = study.ask(spec.distributions())
                storage.record_heartbeat(trial._trial_id)
                trial.set_user_attr("heartbeat", True)  # see fail_dead_trials
                description = f"{spec.algorithm.name} on {spec.workload} (study {spec.study}, trial {trial.number})"
                return _InFlight(spec, study, trial, description)
        return None

    def task(flight: _InFlight) -> dict[str, Any]:
        spec = flight.spec
        point = spec.algorithm.point(flight.trial.params)
        flight.trial.set_user_attr("point", point)
        return {"key": flight.trial._trial_id, "workload": spec.workload, "workload_options": spec.workload_options,
                "algorithm": spec.algorithm, "point": point, "seed": spec.trial_seed(flight.trial.number),
                "max_steps": spec.max_steps, "target": spec.target}  # fmt: skip

    def tell(flight: _InFlight, result: TrialResult) -> None:
        nonlocal finished_here
        flight.trial.set_user_attr("result", result.as_dict())
        value = result.best_metric if flight.spec.ruleset == "calibrate" else result.seconds_to_target
        flight.study.tell(flight.trial, value)
        progress.finish(str(flight.trial._trial_id), flight.description, result)
        finished_here += 1
        if stop_after is not None and finished_here >= stop_after:
            raise KeyboardInterrupt(f"stopped after {finished_here} trials (stop_after)")

    def drain_queue() -> None:
        while queue is not None and not queue.empty():
            key, step = queue.get_nowait()
            progress.advance(str(key), step)

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    try:
        stale_checked = 0.0
        while True:
            if time.monotonic() - stale_checked > (storage.get_heartbeat_interval() or HEARTBEAT_FALLBACK):
                for study in studies.values():
                    fail_stale_trials(study)  # a dead process's trials: failed, re-queued with the same parameters
                    fail_dead_trials(study, storage)
                stale_checked = time.monotonic()
                saturated.clear()
            while len(in_flight) < jobs and (flight := next_trial()) is not None:
                key = str(flight.trial._trial_id)
                in_flight[key] = flight
                progress.start(key, flight.description, flight.spec.max_steps)
                if pool is None:
                    result = execute(task(flight), lambda step, _total, key=key: progress.advance(key, step))
                    del in_flight[key]
                    tell(flight, result)
                else:
                    futures[pool.submit(execute, task(flight))] = key
            if not futures:
                if all(_count(studies[s.name], TrialState.COMPLETE) >= s.trials for s in specs):
                    return
                time.sleep(1.0)  # other processes run the rest; wait for them or for their heartbeats to go stale
                continue
            ready, _ = wait(list(futures), timeout=0.2, return_when=FIRST_COMPLETED)
            drain_queue()
            for future in ready:
                key = futures.pop(future)
                flight = in_flight.pop(key)
                tell(flight, future.result())
    except BaseException:
        for flight in in_flight.values():  # neither lost nor half-recorded: failed now, re-queued for the rerun
            flight.study.tell(flight.trial, state=TrialState.FAIL)
            flight.study.enqueue_trial(flight.trial.params, user_attrs={"retry_of": flight.trial.number})
        in_flight.clear()
        raise
    finally:
        beating.set()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
