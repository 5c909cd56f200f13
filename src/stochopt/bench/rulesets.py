"""The tuning rulesets of AlgoPerf (Dahl et al., 2023, section 4.3), with Optuna doing the search and the books.

- **external tuning**: per (workload, algorithm), ``studies`` independent studies of ``trials`` trials each; the
  trials of a study sample the algorithm's search space with Optuna's ``QMCSampler`` (scrambled Sobol, seeded per
  study); a study scores its fastest trial, the workload the median over studies.
- **self-tuning**: the algorithm's defaults only, 3x the step budget, one trial per study.
- **calibrate**: external tuning of the baselines without early stopping, to set targets (:mod:`.calibrate`).

Note that Optuna's QMCSampler draws a study's very first trial with its (seeded) independent sampler to learn the
search space; the later trials follow the Sobol sequence.

``jobs > 1`` runs trials in that many worker processes (forked from a server that imported torch once); only this
process writes to the storage. Several ``stochopt bench`` processes (or machines, with a PostgreSQL URL) can share
one storage: each asks Optuna for the next trial, so none is run twice. Timings are wall-clock: parallel jobs on a
loaded machine slow each other down.

No trial can block the benchmark:

- a trial that raises is a failed trial (infinite time) with its exception in the results (:mod:`.runner`), and
  the run goes on;
- a trial whose process died (a worker killed, crashed or ``os._exit``; with ``jobs = 1`` the ``stochopt bench``
  process itself, found by its stale heartbeat on the next run) is run once more, with the same hyperparameters
  and seed, and recorded as failed if its process dies again;
- a failure is a finished trial like any other: a rerun never repeats it;
- Ctrl-C (or any error of the benchmark itself, such as a workload whose set-up fails) stops the run: the trials
  in flight are re-queued, not counted, for the rerun.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import multiprocessing.connection
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from optuna.storages import RDBStorage, fail_stale_trials
from optuna.trial import TrialState

from stochopt.bench.algorithms import Algorithm
from stochopt.bench.runner import TrialResult, failed_result, run_trial
from stochopt.bench.storage import DEATH_RETRIES, asking, carried, death_reason

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
    def retry(self, key: str, description: str, reason: str) -> None:
        """The trial's process died (``reason``); it starts again from step 0 in a fresh process."""


_WORKLOADS: dict[tuple[str, str], Any] = {}


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
    """Run one trial described by plain data (picklable: it crosses into worker processes). What the trial
    raises is its failed result (:func:`.runner.run_trial`); a workload that cannot be set up raises."""
    workload = _workload(task["workload"], task["workload_options"])
    return run_trial(workload, task["algorithm"], task["point"], task["seed"], task["max_steps"], task["target"],
                     progress)  # fmt: skip


def _serve(conn: Any) -> None:
    """A worker process: run the trials it is sent, one at a time, and send back ``("progress", step)`` messages
    and then ``("result", TrialResult)``, or ``("error", text)`` when the workload could not be set up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it re-queues the trials, ends workers
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if task is None:
            return
        try:
            result = execute(task, lambda step, _total: conn.send(("progress", step)))
        except Exception as err:
            text = "".join(traceback.format_exception_only(type(err), err)).strip()
            conn.send(("error", f"workload {task['workload']!r} failed in a worker process: {text}"))
            continue
        conn.send(("result", result))


def _how(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


@dataclass
class _Worker:
    process: Any
    conn: Any
    key: str | None = None  # the trial it runs
    step: int = 0  # the last step it reported


class _Workers:
    """Worker processes, each running one trial at a time; a worker that dies is dropped (a new one is
    started for the next trial) and reported with the trial it held, which a pool of processes cannot tell."""

    def __init__(self) -> None:
        # forked from a server that has imported torch and stochopt once, a worker (or the replacement of one that
        # died) starts in a fraction of a second instead of several; spawned where there is no forkserver (Windows)
        if "forkserver" in multiprocessing.get_all_start_methods():
            self.context = multiprocessing.get_context("forkserver")
            self.context.set_forkserver_preload([__name__])
        else:
            self.context = multiprocessing.get_context("spawn")
        self.workers: list[_Worker] = []

    def submit(self, key: str, task: dict[str, Any]) -> None:
        for worker in [w for w in self.workers if w.key is None and not w.process.is_alive()]:
            self._drop(worker)
        worker = next((w for w in self.workers if w.key is None), None)
        if worker is None:
            parent, child = self.context.Pipe()
            process = self.context.Process(target=_serve, args=(child,), daemon=True, name="stochopt-bench-worker")
            process.start()
            child.close()
            worker = _Worker(process, parent)
            self.workers.append(worker)
        worker.key, worker.step = key, 0
        try:
            worker.conn.send(task)
        except OSError:  # it died idle: the trial has not started, so give it to a fresh worker
            worker.key = None
            self._drop(worker)
            self.submit(key, task)

    def poll(self, timeout: float) -> list[tuple[str, str, Any]]:
        """Wait up to ``timeout`` seconds; ``(kind, key, value)`` events: ``progress`` (step), ``result``
        (TrialResult), ``error`` (text) and ``died`` ((how, last step))."""
        busy = [w for w in self.workers if w.key is not None]
        if not busy:
            return []
        ready = set(multiprocessing.connection.wait([w.conn for w in busy] + [w.process.sentinel for w in busy],
                                                    timeout))  # fmt: skip
        events: list[tuple[str, str, Any]] = []
        for worker in busy:
            if worker.conn not in ready and worker.process.sentinel not in ready:
                continue
            key = worker.key
            try:
                while worker.key is not None and worker.conn.poll():
                    kind, value = worker.conn.recv()
                    if kind == "progress":
                        worker.step = value
                    else:
                        worker.key = None
                    events.append((kind, key, value))
            except (EOFError, OSError):  # it died while sending
                pass
            if worker.key is not None and not worker.process.is_alive():
                worker.process.join()
                events.append(("died", key, (_how(worker.process.exitcode), worker.step)))
                worker.key = None
                self._drop(worker)
        return events

    def _drop(self, worker: _Worker) -> None:
        self.workers.remove(worker)
        worker.conn.close()
        worker.process.join(0)

    def close(self) -> None:
        """Idle workers are told to exit; busy ones (their trials re-queued) are terminated."""
        for worker in self.workers:
            try:
                if worker.key is None:
                    worker.conn.send(None)
                else:
                    worker.process.terminate()
            except OSError:
                pass
        for worker in self.workers:
            worker.process.join(10)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
        self.workers.clear()


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
    heartbeat right after ``ask``, so a trial without one after the grace period is dead; it never started, so
    this is not one of its deaths."""
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
        study.enqueue_trial(trial.params, user_attrs=carried(trial.user_attrs, trial.number))


@dataclass
class _InFlight:
    spec: StudySpec
    study: optuna.Study
    trial: optuna.Trial
    description: str
    deaths: int = 0  # of its processes so far (a retry of a stale trial starts at 1)
    task: dict[str, Any] = field(default_factory=dict)


def run_studies(
    specs: list[StudySpec], storage: RDBStorage, jobs: int = 1, progress: ProgressSink | None = None,
    stop_after: int | None = None,
) -> None:  # fmt: skip
    """Run every missing trial of ``specs`` (``jobs`` at a time), writing each result to ``storage`` as it ends.

    Finished trials are skipped; trials another process is running are waited for; trials of a dead process are
    re-queued once (heartbeats), then recorded as failed; so are the trials of a dead worker. A trial that raises is
    recorded as failed. On Ctrl-C or an error of the benchmark itself the trials in flight are marked failed and
    re-queued with the same hyperparameters, then the exception propagates: the next run resumes. ``stop_after``
    raises ``KeyboardInterrupt`` after that many trials of this call (to test resuming)."""
    progress = progress or ProgressSink()
    studies = {spec.name: create_study(storage, spec) for spec in specs}
    total = sum(spec.trials for spec in specs)
    done = sum(min(_count(studies[s.name], TrialState.COMPLETE), s.trials) for s in specs)
    progress.plan(total, done)
    in_flight: dict[str, _InFlight] = {}
    finished_here = 0
    beating = threading.Event()
    pool = _Workers() if jobs > 1 else None

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
            with asking(storage, spec.name):  # count and ask as one step across processes (storage.asking)
                full = _count(study, TrialState.COMPLETE, TrialState.RUNNING) >= spec.trials
                trial = None if full else study.ask(spec.distributions())
            if trial is None:
                saturated.add(spec.name)
            else:
                storage.record_heartbeat(trial._trial_id)
                trial.set_user_attr("heartbeat", True)  # see fail_dead_trials
                description = f"{spec.algorithm.name} on {spec.workload} (study {spec.study}, trial {trial.number})"
                return _InFlight(spec, study, trial, description)
        return None

    def task(flight: _InFlight) -> dict[str, Any]:
        spec, trial = flight.spec, flight.trial
        attrs = trial.user_attrs  # a re-queued trial carries its seed and deaths (storage.carried)
        flight.deaths = int(attrs.get("deaths", 0))
        seed = int(attrs.get("seed", spec.trial_seed(trial.number)))
        point = spec.algorithm.point(trial.params)
        trial.set_user_attr("point", point)
        trial.set_user_attr("seed", seed)
        return {"workload": spec.workload, "workload_options": spec.workload_options,
                "algorithm": spec.algorithm, "point": point, "seed": seed, "max_steps": spec.max_steps,
                "target": spec.target}  # fmt: skip

    def tell(flight: _InFlight, result: TrialResult) -> None:
        nonlocal finished_here
        flight.trial.set_user_attr("result", result.as_dict())
        value = result.best_metric if flight.spec.ruleset == "calibrate" else result.seconds_to_target
        flight.study.tell(flight.trial, value)
        progress.finish(str(flight.trial._trial_id), flight.description, result)
        finished_here += 1
        if stop_after is not None and finished_here >= stop_after:
            raise KeyboardInterrupt(f"stopped after {finished_here} trials (stop_after)")

    def died(key: str, how: str, step: int) -> None:
        """A worker died in the trial: run it again in a fresh one, or, the second time, record it failed."""
        flight = in_flight[key]
        flight.deaths += 1
        flight.trial.set_user_attr("deaths", flight.deaths)  # kept if this process dies too (storage.RetryOnce)
        if flight.deaths > DEATH_RETRIES:
            del in_flight[key]
            reason = death_reason(flight.deaths, f"{how} after step {step}")
            tell(flight, failed_result(reason, flight.spec.target, step))
            return
        progress.retry(key, flight.description, f"its process died ({how} after step {step}); running it again")
        progress.advance(key, 0)
        assert pool is not None
        pool.submit(key, flight.task)

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    try:
        stale_checked = 0.0
        while True:
            if time.monotonic() - stale_checked > (storage.get_heartbeat_interval() or HEARTBEAT_FALLBACK):
                for study in studies.values():
                    fail_stale_trials(study)  # a dead process's trials: failed, re-queued once (storage.RetryOnce)
                    fail_dead_trials(study, storage)
                stale_checked = time.monotonic()
                saturated.clear()
            while len(in_flight) < jobs and (flight := next_trial()) is not None:
                key = str(flight.trial._trial_id)
                in_flight[key] = flight
                progress.start(key, flight.description, flight.spec.max_steps)
                flight.task = task(flight)
                if pool is None:
                    result = execute(flight.task, lambda step, _total, key=key: progress.advance(key, step))
                    del in_flight[key]
                    tell(flight, result)
                else:
                    pool.submit(key, flight.task)
            if not in_flight:
                if all(_count(studies[s.name], TrialState.COMPLETE) >= s.trials for s in specs):
                    return
                time.sleep(1.0)  # other processes run the rest; wait for them or for their heartbeats to go stale
                continue
            assert pool is not None
            for kind, key, value in pool.poll(0.2):
                if kind == "progress":
                    progress.advance(key, value)
                elif kind == "result":
                    tell(in_flight.pop(key), value)
                elif kind == "died":
                    died(key, *value)
                else:  # the benchmark's own failure (a workload that cannot be set up): stop, re-queue
                    raise RuntimeError(value)
    except BaseException:
        for flight in in_flight.values():  # neither lost nor half-recorded: failed now, re-queued for the rerun
            attrs = carried(flight.trial.user_attrs, flight.trial.number)
            flight.study.tell(flight.trial, state=TrialState.FAIL)
            flight.study.enqueue_trial(flight.trial.params, user_attrs=attrs)
        in_flight.clear()
        raise
    finally:
        beating.set()
        if pool is not None:
            pool.close()
