"""Several ``stochopt bench`` processes on one real PostgreSQL server (tests/bench/postgres.py starts it, installing
Debian's package first where the machine has none): what docs/benchmark.md promises for ``--storage
postgresql://...``. Each process is a real subprocess of the command line, as on several machines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from stochopt.bench.storage import load_records, open_storage
from stochopt.bench.suite import run_benchmark

HERE = Path(__file__).parent
CLI = [sys.executable, "-m", "stochopt.cli", "bench"]
# the command line with heartbeats every second, stale after 3 s (instead of 5 s and 20 s: recovering a killed
# process takes seconds): the defaults of open_storage changed on the function itself, whoever imports it how;
# everything else is `stochopt bench` as it ships
FAST_HEARTBEAT_CLI = [sys.executable, "-c", """
import inspect, sys
from stochopt.bench.storage import open_storage
fast = {"heartbeat": 1, "grace": 3}
params = [p for p in inspect.signature(open_storage).parameters.values() if p.default is not p.empty]
assert set(fast) <= {p.name for p in params}, params
positional = [p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
open_storage.__defaults__ = tuple(fast.get(p.name, p.default) for p in positional) or None
open_storage.__kwdefaults__ = {p.name: fast.get(p.name, p.default) for p in params if p.kind is p.KEYWORD_ONLY} or None
from stochopt.cli import main
raise SystemExit(main(sys.argv[1:]))
""", "bench"]  # fmt: skip
OPEN_AT_ONCE = """
import sys, time
from stochopt.bench.storage import open_storage
start = float(sys.argv[2])
while time.time() < start:  # every process past its imports, then all at the same instant
    time.sleep(0.001)
open_storage(sys.argv[1])
print("opened")
"""


def env(**extra: str) -> dict[str, str]:
    paths = [str(HERE), str(HERE.parents[1] / "src"), os.environ.get("PYTHONPATH", "")]
    # one thread per process (two benchmark processes and the tests share two cores); progress lines unwrapped
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "OMP_NUM_THREADS": "1",
            "COLUMNS": "200", **extra}  # fmt: skip


def bench(cmd: list[str], workloads: list[str], algorithms: list[str], trials: int, url: str, out: Path,
          **extra_env: str) -> subprocess.Popen:  # fmt: skip
    args = ["--workloads", *workloads, "--algorithms", *algorithms, "--trials", str(trials), "--storage", url,
            "--out", str(out)]  # fmt: skip
    return subprocess.Popen(cmd + args, env=env(**extra_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


class Output:
    """A process's stdout and stderr, read as it runs (a full pipe would block it)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.text = proc, {"stdout": [], "stderr": []}
        self.threads = [threading.Thread(target=self._read, args=(name,), daemon=True) for name in self.text]
        for thread in self.threads:
            thread.start()

    def _read(self, name: str) -> None:
        for line in getattr(self.proc, name):
            self.text[name].append(line)

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"still running after {timeout} s:\n{self}") from None
        for thread in self.threads:
            thread.join(10)
        return code

    def trials_run(self) -> int:
        """Trials this process finished: the progress prints one line each, 'ALGORITHM on WORKLOAD (study S,
        trial N): ...'."""
        return sum(1 for line in self.text["stderr"] if ", trial " in line and "): " in line)

    def __str__(self) -> str:
        return "".join(self.text["stdout"] + self.text["stderr"])[-4000:]


def studies(url: str) -> dict[str, list[optuna.trial.FrozenTrial]]:
    storage = open_storage(url)
    return {name: optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
            for name in optuna.get_all_study_names(storage)}  # fmt: skip


def states(trials: list[optuna.trial.FrozenTrial]) -> dict[str, int]:
    return dict(Counter(t.state.name for t in trials))


def point(trial: optuna.trial.FrozenTrial) -> tuple:
    return tuple(sorted(trial.params.items()))


def test_processes_opening_a_fresh_database_at_the_same_instant_all_open_it(postgres_url):
    # each tries to create Optuna's tables in the empty database; all but one lose that race (optuna#1092)
    start = time.time() + 3
    cmd = [sys.executable, "-c", OPEN_AT_ONCE, postgres_url, str(start)]
    procs = [subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(3)]  # fmt: skip
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 3, outputs
    assert all(out.strip().endswith("opened") for out in outputs), outputs


WORKLOADS = ["tiny_workloads:TinyRegression", "tiny_workloads:TinyClassifier"]
ALGORITHMS = ["nadamw", "heavy_ball"]
TRIALS = 4


def test_two_processes_share_the_benchmark_no_trial_lost_none_run_twice(postgres_url, tmp_path):
    procs = [Output(bench(CLI, WORKLOADS, ALGORITHMS, TRIALS, postgres_url, tmp_path / f"out{i}")) for i in range(2)]
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0], "\n".join(map(str, procs))
    stored = studies(postgres_url)
    assert len(stored) == len(WORKLOADS) * len(ALGORITHMS)
    for name, trials in stored.items():
        # every planned trial finished, exactly once: none lost, none failed or left running, none extra
        assert states(trials) == {"COMPLETE": TRIALS}, name
        assert len({point(t) for t in trials}) == TRIALS, f"{name}: a point was drawn twice"
        assert sorted(t.number for t in trials) == list(range(TRIALS))
    run = [p.trials_run() for p in procs]
    assert sum(run) == len(stored) * TRIALS and min(run) >= 1, run  # both ran trials; together, each trial once
    for i in range(2):  # each process reports the whole benchmark, whichever process ran a trial
        report = json.loads((tmp_path / f"out{i}" / "results.json").read_text())
        assert len(report["trials"]) == len(stored) * TRIALS

    # the same trials as one process alone on SQLite: the same points, seeds and so the same curves
    alone = run_benchmark(WORKLOADS, ALGORITHMS, trials=TRIALS, storage=str(tmp_path / "alone.db"))
    shared = load_records(open_storage(postgres_url))

    def runs(records):
        return {(r.workload, r.algorithm, r.trial): (r.point, [(s, m) for s, _, m in r.result["curve"]])
                for r in records}  # fmt: skip

    expected, got = runs(alone.records), runs(shared)
    assert expected.keys() == got.keys()
    for key, (expected_point, expected_curve) in expected.items():
        assert got[key][0] == expected_point, key
        assert [s for s, _ in got[key][1]] == [s for s, _ in expected_curve], key
        assert [m for _, m in got[key][1]] == pytest.approx([m for _, m in expected_curve], rel=1e-5, abs=1e-7), key


def test_a_process_killed_midway_is_recovered_by_the_other(postgres_url, tmp_path):
    marker = tmp_path / "victim-in-trial"
    args = (["stall_workloads:StallOnce"], ["adamw", "heavy_ball"], 4, postgres_url)
    victim = Output(bench(FAST_HEARTBEAT_CLI, *args, tmp_path / "victim", STOCHOPT_TEST_STALL=str(marker)))
    survivor = Output(bench(FAST_HEARTBEAT_CLI, *args, tmp_path / "survivor"))
    deadline = time.time() + 180
    while not marker.exists():  # the victim is in the middle of its second trial, and stays there
        assert time.time() < deadline, f"the victim never reached its second trial:\n{victim}"
        assert victim.proc.poll() is None, f"the victim exited ({victim.proc.returncode}):\n{victim}"
        time.sleep(0.05)
    running = {(name, t.number): point(t) for name, trials in studies(postgres_url).items() for t in trials
               if t.state == TrialState.RUNNING}  # fmt: skip
    victim.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    assert victim.wait(timeout=30) == -signal.SIGKILL
    assert victim.trials_run() == 1  # killed midway: one trial finished, the second cut off
    assert survivor.wait(timeout=180) == 0, str(survivor)
    recovered = time.monotonic() - killed

    stored = studies(postgres_url)
    failed = [(name, t) for name, trials in stored.items() for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1, [(name, t.number) for name, t in failed]  # the victim's trial, and nothing else
    name, dead = failed[0]
    assert running.get((name, dead.number)) == point(dead)  # it was running when the victim was killed
    assert "heartbeat" in dead.user_attrs  # it had started (not killed inside study.ask)
    for study_name, trials in stored.items():
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        assert len(done) == 4 and states(trials) == {"COMPLETE": 4, **({"FAIL": 1} if study_name == name else {})}
        assert len({point(t) for t in done}) == 4, f"{study_name}: a point was run twice"
        for t in done:  # each a real run with its curve (not the record of a trial that died twice)
            assert len(t.user_attrs["result"]["curve"]) > 1 and t.user_attrs.get("deaths", 0) <= 1, t.number
    retry = [t for t in stored[name] if t.state == TrialState.COMPLETE and point(t) == point(dead)]
    assert len(retry) == 1 and retry[0].number > dead.number  # re-run by the survivor with the same hyperparameters
    assert survivor.trials_run() == 8 - 1  # all but the victim's finished trial, the killed one's retry included
    print(f"the survivor finished {recovered:.1f} s after the kill")
    assert recovered < 60, recovered  # stale after 3 s without heartbeats, checked every second
