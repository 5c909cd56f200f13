"""The trial database: Optuna's RDB storage (an SQLite file by default, any SQLAlchemy URL such as PostgreSQL for
several processes or machines), one Optuna study per (ruleset, workload, algorithm, seed, study index), each trial's
result and validation curve kept as trial user attributes so that ``stochopt report`` can draw them later.

Trials in flight send Optuna heartbeats; a trial whose process died (a crash, SIGKILL, a lost machine) goes stale
after ``grace_period`` seconds, is marked failed and re-queued with the same hyperparameters by Optuna's
``RetryFailedTrialCallback``. Finished trials are never touched again: a rerun only runs what is missing.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from sqlalchemy import event

HEARTBEAT_SECONDS = 5
GRACE_SECONDS = 20


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
        storage = RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat, grace_period=grace,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=None),
        )  # fmt: skip
    except Exception as err:  # SQLAlchemy's and the drivers' errors share no base class worth naming
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"cannot open the results storage {url!r}: {type(err).__name__}: {detail}") from None
    if url.startswith("sqlite"):
        # write-ahead log, synced at checkpoints: a commit costs microseconds instead of an fsync, and a killed
        # process still loses nothing it committed (only a power cut can lose the last transactions)
        event.listen(storage.engine, "connect", _fast_sqlite)
        storage.engine.dispose()
    return storage


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
