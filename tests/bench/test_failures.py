"""No trial can block the benchmark: a trial that raises is a failed trial and the run goes on; a trial whose process
dies is retried once, then recorded as failed; a rerun never repeats a recorded failure."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import optuna
from faulty import Faulty, faults_taken
from optuna.trial import TrialState

from stochopt.bench.algorithms import load_algorithm
from stochopt.bench.report import write_report
from stochopt.bench.rulesets import ProgressSink
from stochopt.bench.runner import run_trial
from stochopt.bench.storage import open_storage
from stochopt.bench.suite import run_benchmark

HERE = Path(__file__).parent
FAULTY = "faulty:Faulty"


class Recorder(ProgressSink):
    def __init__(self):
        self.finished, self.retried = [], []

    def finish(self, key, description, result):
        self.finished.append((description, result))

    def retry(self, key, description, reason):
        self.retried.append((description, reason))


def by_seed(storage, name):
    """seed -> (trial number, state, user attributes) of every trial of the study."""
    study = optuna.load_study(study_name=name, storage=storage)
    out = {}
    for t in study.get_trials(deepcopy=False):
        out.setdefault(t.user_attrs.get("seed"), []).append((t.number, t.state, t.user_attrs))
    return out


def test_a_trial_that_raises_is_recorded_failed_and_the_run_goes_on(tmp_path):
    db, ledger = str(tmp_path / "r.db"), tmp_path / "ledger"
    ledger.mkdir()
    options = {"faults": "0=raise*9", "ledger": str(ledger)}  # seed 0 (trial 0) raises at step 3, every time
    recorder = Recorder()
    result = run_benchmark([FAULTY], ["adamw"], trials=3, storage=db, workload_options=options, progress=recorder)
    assert len(result.records) == 3 and len(recorder.finished) == 3 and faults_taken(ledger, 0) == 1
    failed = [r for r in result.records if r.result["failed"]]
    assert len(failed) == 1 and failed[0].trial == 0
    reason = failed[0].result["reason"]
    assert reason == "raised ValueError at step 3: injected fault | seed 0 at step 3"
    assert math.isinf(failed[0].seconds) and failed[0].result["steps"] == 3
    assert "faulty.py" in failed[0].result["traceback"] and "ValueError" in failed[0].result["traceback"]
    for r in result.records:  # the other trials ran their course
        if r.trial != 0:
            assert not r.result["failed"] and r.result["steps"] > 3 and r.result["traceback"] == ""

    report = write_report(result, tmp_path / "report").read_text()
    assert "## Failed trials" in report and "raised ValueError at step 3: injected fault \\| seed 0" in report
    html = (tmp_path / "report" / "report.html").read_text()
    assert "<h2>Failed trials</h2>" in html and "injected fault | seed 0 at step 3" in html
    data = json.loads((tmp_path / "report" / "results.json").read_text())
    [trial] = [t for t in data["trials"] if t["trial"] == 0]
    assert trial["result"]["reason"] == reason and trial["result"]["seconds_to_target"] is None
    assert reason in (tmp_path / "report" / "results.csv").read_text()

    again = Recorder()
    rerun = run_benchmark([FAULTY], ["adamw"], trials=3, storage=db, workload_options=options, progress=again)
    assert again.finished == [] and faults_taken(ledger, 0) == 1  # the failure stands: it is not run again
    assert sorted((r.trial, r.result["reason"]) for r in rerun.records) == sorted(
        (r.trial, r.result["reason"]) for r in result.records
    )


def test_a_dead_worker_is_retried_once_then_its_trial_is_recorded_failed(tmp_path):
    db, ledger = str(tmp_path / "w.db"), tmp_path / "ledger"
    ledger.mkdir()
    # with seed 0 the trials of study 0 have seeds 0, 1, 2, 3: trial 0 kills its worker every time, trial 1
    # ends its worker once (then runs), trial 2 raises in its worker, trial 3 is fine
    options = {"faults": "0=kill*9,1=exit*1,2=raise*9", "ledger": str(ledger)}
    recorder = Recorder()
    result = run_benchmark([FAULTY], ["adamw"], trials=4, storage=db, jobs=2, workload_options=options,
                           progress=recorder)  # fmt: skip
    assert [faults_taken(ledger, seed) for seed in range(4)] == [2, 1, 1, 0]
    records = {r.trial: r for r in result.records}
    assert sorted(records) == [0, 1, 2, 3] and len(recorder.finished) == 4
    assert records[0].result["failed"] and math.isinf(records[0].seconds)
    # it died in step 3, after reporting step 2
    died = "its process died twice (last: killed by SIGKILL after step 2); not retried again"
    assert records[0].result["reason"] == died and records[0].result["steps"] == 2
    assert not records[1].result["failed"] and records[1].result["steps"] > 3  # its retry ran to the end
    assert records[2].result["reason"].startswith("raised ValueError at step 3: injected fault")
    assert not records[3].result["failed"]
    assert sorted(d for d, _ in recorder.retried) == sorted(
        f"adamw on {FAULTY} (study 0, trial {n})" for n in (0, 1)
    )  # fmt: skip
    name = f"external/{FAULTY}/adamw/seed0/study0"
    trials = by_seed(storage := open_storage(db), name)
    assert [(n, s, a["deaths"]) for n, s, a in trials[0]] == [(0, TrialState.COMPLETE, 2)]
    assert [(n, s, a["deaths"]) for n, s, a in trials[1]] == [(1, TrialState.COMPLETE, 1)]
    # the retry is the same run again: same hyperparameters, same seed, so the same curve as a clean run
    workload = Faulty()
    workload.setup()
    algorithm = load_algorithm("adamw")
    clean = run_trial(workload, algorithm, records[1].point, 1, workload.max_steps, workload.target)
    assert [(s, m) for s, _, m in records[1].result["curve"]] == [(s, m) for s, _, m in clean.curve]

    again = Recorder()
    run_benchmark([FAULTY], ["adamw"], trials=4, storage=storage, jobs=2, workload_options=options, progress=again)
    assert again.finished == [] and [faults_taken(ledger, seed) for seed in range(4)] == [2, 1, 1, 0]


KILLED_RUN = """
import sys
from stochopt.bench.storage import open_storage
from stochopt.bench.suite import run_benchmark
run_benchmark(["faulty:Faulty"], ["adamw"], trials=3, storage=open_storage(sys.argv[1], 1, 2),
              workload_options={"faults": "0=kill*9", "ledger": sys.argv[2]})
"""


def test_a_trial_that_kills_the_bench_process_twice_is_recorded_failed(tmp_path):
    """jobs = 1: the trial runs in the ``stochopt bench`` process; its death is found by the next run's heartbeat
    check, which re-queues it once, and records it as failed when it has killed that run too."""
    db, ledger = str(tmp_path / "k.db"), tmp_path / "ledger"
    ledger.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parents[1] / "src")])}
    for deaths in (1, 2):
        code = subprocess.run([sys.executable, "-c", KILLED_RUN, db, str(ledger)], env=env, timeout=300).returncode
        assert code == -9 and faults_taken(ledger, 0) == deaths
    recorder = Recorder()
    options = {"faults": "0=kill*9", "ledger": str(ledger)}
    result = run_benchmark([FAULTY], ["adamw"], trials=3, storage=open_storage(db, 1, 2), workload_options=options,
                           progress=recorder)  # fmt: skip
    assert faults_taken(ledger, 0) == 2  # not a third time
    failed = [r for r in result.records if r.result["failed"]]
    assert len(result.records) == 3 and len(failed) == 1
    assert failed[0].result["reason"].startswith("its process died twice (last: it stopped sending heartbeats")
    trials = by_seed(open_storage(db), f"external/{FAULTY}/adamw/seed0/study0")
    states = [(s, a.get("deaths", 0)) for _, s, a in trials[0]]
    assert states == [(TrialState.FAIL, 0), (TrialState.FAIL, 1), (TrialState.COMPLETE, 2)]
    assert len({json.dumps(a["point"]) for _, _, a in trials[0]}) == 1  # the same hyperparameters each time
    again = Recorder()
    run_benchmark([FAULTY], ["adamw"], trials=3, storage=open_storage(db, 1, 2), workload_options=options,
                  progress=again)  # fmt: skip
    assert again.finished == [] and faults_taken(ledger, 0) == 2
