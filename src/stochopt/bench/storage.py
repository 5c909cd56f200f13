"""The trial database: Optuna's RDB storage (an SQLite file by default, any SQLAlchemy URL such as PostgreSQL for
several processes or machines), one Optuna study per (ruleset, workload, algorithm, seed, study index), each trial's
result and validation curve kept as trial user attributes so that ``stochopt report`` can draw them later.

Trials in flight send Optuna heartbeats; a trial whose process died (a crash, SIGKILL, a lost machine) goes stale
after ``grace_period`` seconds and is marked failed by Optuna; :class:`RetryOnce` then re-queues it once with the
same hyperparameters and seed, and records it as a failed trial (infinite time) when its retry dies too, so that a
trial that kills its process cannot be run again and again. Finished trials, failures included, are never touched
again: a rerun only runs what is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import event

HEARTBEAT_SECONDS = 5
GRACE_SECONDS = 20
#: a trial whose process died is run again this many times, then recorded as failed
DEATH_RETRIES = 1
#: user attributes a re-queued trial keeps: its point and seed (the same run again) and its deaths so far
CARRIED = ("point", "seed", "deaths")


def quiet_optuna() -> None:
    """Optuna logs each trial and warns that heartbeats are meant for ``Study.optimize`` (we drive ask/tell and
    send the heartbeats ourselves); the benchmark prints its own progress instead."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", message=".*Heartbeat of storage.*")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def storage_url(spec: str) -> str:
    """A SQLAlchemy URL as given, or a file path made into ``sqlite:///`` (its folder created)."""
    if "://" in spec:
        return spec
    path = Path(spec).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def open_storage(spec: str, heartbeat: int = HEARTBEAT_SECONDS, grace: int = GRACE_SECONDS) -> RDBStorage:
    """Open (creating if needed) the results database; an unreachable or malformed URL is one ValueError."""
    quiet_optuna()
    url = storage_url(spec)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("postgres"):
        engine_kwargs = {"connect_args": {"connect_timeout": 10}}  # fail in seconds, not after TCP's minutes
    elif url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 60}}  # wait for another process's write lock
    try:
        storage = _retrying(RDBStorage)(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat, grace_period=grace,
            heartbeat_stale_trial_callback=RetryOnce(),
        )  # fmt: skip
    except Exception as err:  # SQLAlchemy's and the drivers' errors share no base class worth naming
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        hint = ' (pip install "stochopt[postgres]" installs the driver)' if (
            url.startswith("postgres") and isinstance(err, ImportError)) else ""  # fmt: skip
        raise ValueError(f"cannot open the results storage {url!r}: {type(err).__name__}: {detail}{hint}") from None
    if url.startswith("sqlite"):
        # write-ahead log, synced at checkpoints: a commit costs microseconds instead of an fsync, and a killed
        # process still loses nothing it committed (only a power cut can lose the last transactions)
        event.listen(storage.engine, "connect", _fast_sqlite)
        storage.engine.dispose()
    return storage


def carried(user_attrs: dict[str, Any], number: int) -> dict[str, Any]:
    """The user attributes of a re-queued copy of trial ``number``."""
    return {**{k: user_attrs[k] for k in CARRIED if k in user_attrs}, "retry_of": number}


def death_reason(deaths: int, how: str) -> str:
    """Why a trial whose process died ``deaths`` times (the last time ``how``) is recorded as failed."""
    times = "once" if deaths == 1 else "twice" if deaths == 2 else f"{deaths} times"
    return f"its process died {times} (last: {how}); not retried again"


def died_result(deaths: int, how: str, target: float | None, steps: int = 0) -> dict[str, Any]:
    """The result stored for a trial whose process died ``deaths`` times."""
    from stochopt.bench.runner import failed_result  # torch, only when a trial died

    return failed_result(death_reason(deaths, how), target, steps).as_dict()


def record_failure(study: optuna.Study, trial: FrozenTrial, result: dict[str, Any], deaths: int) -> None:
    """Add a finished, failed copy of ``trial`` (infinite time, ``result`` saying why) to ``study``: it counts
    among the study's trials, so no rerun tries it again."""
    attrs = {**carried(trial.user_attrs, trial.number), "deaths": deaths, "result": result}
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.COMPLETE, value=math.inf, params=trial.params, distributions=trial.distributions,
        user_attrs=attrs,
    ))  # fmt: skip


class RetryOnce:
    """Optuna's heartbeat-stale callback: the first death of a trial's process re-queues the trial with the same
    hyperparameters and seed; a death after :data:`DEATH_RETRIES` retries records it as failed. A trial killed
    before its first heartbeat was recorded (inside ``study.ask``) never started: it is re-queued uncounted."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if "heartbeat" not in trial.user_attrs:
            study.enqueue_trial(trial.params, user_attrs=carried(trial.user_attrs, trial.number))
            return
        deaths = int(trial.user_attrs.get("deaths", 0)) + 1
        if deaths <= DEATH_RETRIES:
            study.enqueue_trial(trial.params, user_attrs={**carried(trial.user_attrs, trial.number), "deaths": deaths})
            return
        how = "it stopped sending heartbeats: killed, crashed or lost"
        record_failure(study, trial, died_result(deaths, how, study.user_attrs.get("target")), deaths)


def _retrying(create: Any) -> Any:
    """``create`` again when it lost the race to create a fresh database's tables: processes that open one at the
    same moment (several ``stochopt bench`` on a new PostgreSQL database) all try to create them and all but one
    fail (optuna#1092, a duplicate key or a table that already exists); a retry finds the tables made."""

    def call(*args: Any, **kwargs: Any) -> Any:
        for attempt in range(5):
            try:
                return create(*args, **kwargs)
            except Exception as err:
                errors = [err, err.__cause__]
                lost = any(type(e).__name__ == "IntegrityError" or "already exists" in str(e) for e in errors if e)
                if not lost or attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    return call


@contextlib.contextmanager
def asking(storage: RDBStorage, name: str) -> Iterator[None]:
    """Hold the lock ``name`` against every process on ``storage`` (a PostgreSQL advisory lock, held by a
    transaction and so released when it ends or its process dies; a lock file beside an SQLite file; none on other
    databases). The runner counts a study's trials and asks Optuna for the next one under it: processes asking at
    the same instant would otherwise both take the last trial (one too many), or draw the same point (Optuna's
    QMCSampler counts its Sobol draws in a study attribute it reads and then writes, and draws the first trial with
    a seeded sampler that every process repeats until that trial's parameters are stored)."""
    engine = getattr(storage, "engine", None)
    dialect = engine.dialect.name if engine is not None else ""
    if dialect == "postgresql":
        from sqlalchemy import text

        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        with engine.begin() as connection:
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
            yield
    elif dialect == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            yield
            return
        with open(f"{engine.url.database}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released on close, or when the process dies
            yield
    else:
        yield


def _fast_sqlite(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


@dataclass(frozen=True)
class TrialRecord:
    """One finished trial as stored: what ran, and its result (see :class:`stochopt.bench.runner.TrialResult`)."""

    ruleset: str
    workload: str
    algorithm: str
    seed: int
    study: int
    trial: int
    point: dict[str, Any]
    result: dict[str, Any]
    metric: str
    target: float | None

    @property
    def seconds(self) -> float:
        return float(self.result["seconds_to_target"])

    @property
    def steps(self) -> float:
        return float(self.result["steps_to_target"])


def load_records(storage: RDBStorage, ruleset: str | None = None, names: list[str] | None = None) -> list[TrialRecord]:
    """Every finished trial of the benchmark's studies (those of ``ruleset``, or only the studies ``names``)."""
    records = []
    for summary in optuna.study.get_all_study_summaries(storage, include_best_trial=False):
        attrs = summary.user_attrs
        if "workload" not in attrs or (ruleset and attrs["ruleset"] != ruleset):
            continue
        if names is not None and summary.study_name not in names:
            continue
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            records.append(TrialRecord(
                attrs["ruleset"], attrs["workload"], attrs["algorithm"], attrs["seed"], attrs["study"], trial.number,
                trial.user_attrs.get("point", {}), trial.user_attrs["result"], attrs.get("metric", "metric"),
                attrs.get("target"),
            ))  # fmt: skip
    return records
