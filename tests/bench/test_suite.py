"""The benchmark end to end on tiny workloads: rulesets on Optuna storage, resume, parallel jobs, report, CLI."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from stochopt.bench.calibrate import calibrate
from stochopt.bench.report import write_report
from stochopt.bench.rulesets import ProgressSink
from stochopt.bench.storage import load_records, open_storage
from stochopt.bench.suite import run_benchmark
from stochopt.cli import main

HERE = Path(__file__).parent
REGRESSION, CLASSIFIER = "tiny_workloads:TinyRegression", "tiny_workloads:TinyClassifier"


class Recorder(ProgressSink):
    def __init__(self):
        self.finished = []
        self.planned = None

    def plan(self, total, done):
        self.planned = (total, done)

    def finish(self, key, description, result):
        self.finished.append(description)


def finished(records):
    return {(r.workload, r.algorithm, r.study, r.trial): (r.point, r.result) for r in records}


def test_external_tuning_end_to_end_with_report(tmp_path):
    result = run_benchmark([REGRESSION, CLASSIFIER], ["nadamw", "heavy_ball"], "external", trials=2, studies=2,
                           storage=str(tmp_path / "b.db"), seed=1)  # fmt: skip
    assert len(result.records) == 2 * 2 * 2 * 2
    # each study's points are distinct quasirandom draws inside the search space
    points = [r.point["lr"] for r in result.records if r.workload == REGRESSION and r.algorithm == "nadamw"]
    assert len(set(points)) == 4 and all(3e-4 <= lr <= 3e-2 for lr in points)
    table = result.table("seconds")
    for workload, row in table.items():
        for algorithm, value in row.items():
            studies = {}
            for r in result.records:
                if (r.workload, r.algorithm) == (workload, algorithm):
                    studies[r.study] = min(studies.get(r.study, math.inf), r.seconds)
            expected = sorted(studies.values())
            assert value == (math.inf if math.inf in expected else sum(expected) / 2)
    assert any(math.isfinite(v) for row in table.values() for v in row.values())
    report = write_report(result, tmp_path / "report")
    for name in ("report.md", "report.html", "profiles.png", "results.csv", "results.json"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    assert "| benchmark score (seconds) |" in report.read_text() and "| benchmark score (steps) |" in report.read_text()
    data = json.loads((tmp_path / "report" / "results.json").read_text())
    assert len(data["trials"]) == 16 and data["trials"][0]["result"]["curve"][0][0] == 0
    assert len((tmp_path / "report" / "results.csv").read_text().splitlines()) == 17


def test_self_tuning_runs_the_defaults_with_three_times_the_budget(tmp_path):
    result = run_benchmark([CLASSIFIER], ["adamw"], "self", trials=7, studies=2, storage=str(tmp_path / "s.db"))
    assert len(result.records) == 2  # one trial per study, whatever --trials says
    for r in result.records:
        assert r.point == {"lr": 3e-3, "one_minus_beta1": 0.1, "one_minus_beta2": 0.005, "weight_decay": 0.01,
                           "warmup_fraction": 0.05}  # fmt: skip
    storage = open_storage(str(tmp_path / "s.db"))
    study = optuna.load_study(study_name="self/tiny_workloads:TinyClassifier/adamw/seed0/study0", storage=storage)
    assert study.user_attrs["max_steps"] == 3 * 40


def test_same_seed_same_points_and_curves_in_a_fresh_database(tmp_path):
    runs = [run_benchmark([REGRESSION], ["adamw"], trials=3, storage=str(tmp_path / f"{i}.db"), seed=5)
            for i in range(2)]  # fmt: skip
    a, b = (sorted((r.trial, r.point["lr"], [(s, m) for s, _, m in r.result["curve"]]) for r in run.records)
            for run in runs)  # fmt: skip
    assert a == b


def test_interrupted_run_resumes_without_losing_or_repeating_trials(tmp_path):
    db = str(tmp_path / "r.db")
    args = ([REGRESSION, CLASSIFIER], ["adamw", "torch.optim.SGD"])
    first = Recorder()
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(*args, trials=3, storage=db, progress=first, stop_after=5)
    before = finished(load_records(open_storage(db)))
    assert len(first.finished) == len(before) == 5
    second = Recorder()
    result = run_benchmark(*args, trials=3, storage=db, progress=second)
    assert second.planned == (12, 5) and len(second.finished) == 12 - 5
    after = finished(result.records)
    assert len(after) == 12 and {k: after[k] for k in before} == before  # the first five untouched
    third = Recorder()
    fewer = run_benchmark(*args, trials=2, storage=db, progress=third)
    assert third.finished == []  # nothing left to run
    assert sorted(finished(fewer.records)) == sorted(k for k in after if k[3] < 2)  # each study's first two


def test_ctrl_c_inside_a_trial_requeues_it_with_the_same_hyperparameters(tmp_path):
    from tiny_workloads import Interrupted

    db, spec = str(tmp_path / "i.db"), "tiny_workloads:Interrupted"
    Interrupted.interrupt_at, Interrupted.calls = 2 * 60 + 30, 0  # in the middle of the third trial
    with pytest.raises(KeyboardInterrupt):
        run_benchmark([spec], ["adamw"], trials=4, storage=db)
    storage = open_storage(db)
    study = optuna.load_study(study_name=f"external/{spec}/adamw/seed0/study0", storage=storage)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    interrupted_lr = study.trials[2].params["lr"]
    before = finished(load_records(storage))
    Interrupted.interrupt_at = None
    recorder = Recorder()
    result = run_benchmark([spec], ["adamw"], trials=4, storage=db, progress=recorder)
    after = finished(result.records)
    assert len(recorder.finished) == 2 and len(after) == 4 and {k: after[k] for k in before} == before
    assert interrupted_lr in {point["lr"] for point, _ in after.values()}


def test_changed_target_on_an_existing_storage_is_refused(tmp_path, monkeypatch):
    from tiny_workloads import TinyClassifier

    db = str(tmp_path / "t.db")
    run_benchmark([CLASSIFIER], ["heavy_ball"], trials=1, storage=db)
    monkeypatch.setattr(TinyClassifier, "target", 0.2)
    with pytest.raises(ValueError, match="defined differently"):
        run_benchmark([CLASSIFIER], ["heavy_ball"], trials=1, storage=db)


KILLED_RUN = """
import sys
from stochopt.bench.storage import open_storage
from stochopt.bench.suite import run_benchmark
run_benchmark(["tiny_workloads:SlowRegression"], ["adamw"], trials=6, storage=open_storage(sys.argv[1], 1, 2))
"""


def test_a_run_killed_with_sigkill_is_resumed_by_the_next(tmp_path):
    db = str(tmp_path / "k.db")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parents[1] / "src")])}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, db], env=env)
    name = "external/tiny_workloads:SlowRegression/adamw/seed0/study0"
    deadline = time.time() + 120
    completed, study = [], None
    while time.time() < deadline and len(completed) < 2 and proc.poll() is None:
        time.sleep(0.2)
        if study is None:
            try:
                study = optuna.load_study(study_name=name, storage=f"sqlite:///{Path(db).resolve()}")
            except KeyError:  # the killed run has not created its study yet
                continue
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed in the middle, not finished
    assert 2 <= len(completed) < 6
    storage = open_storage(db, heartbeat=1, grace=2)
    before = finished(load_records(storage))
    # a trial killed after it drew its hyperparameters (one killed before has none to keep)
    running = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING and t.params]
    recorder = Recorder()
    result = run_benchmark(["tiny_workloads:SlowRegression"], ["adamw"], trials=6, storage=storage,
                           progress=recorder)  # fmt: skip
    after = finished(result.records)
    assert len(after) == 6 and len(recorder.finished) == 6 - len(before)
    assert {k: after[k] for k in before} == before
    if running:  # the killed trial was re-run with the same hyperparameters
        lrs = {v[0]["lr"] for v in after.values()}
        assert all(t.params["lr"] in lrs for t in running)


def test_parallel_jobs_share_the_storage(tmp_path):
    result = run_benchmark([CLASSIFIER], ["adamw", "heavy_ball"], trials=2, storage=str(tmp_path / "j.db"), jobs=2)
    assert len(result.records) == 4
    serial = run_benchmark([CLASSIFIER], ["adamw", "heavy_ball"], trials=2, storage=str(tmp_path / "s.db"))
    curves = [sorted((r.workload, r.algorithm, r.trial, [(s, m) for s, _, m in r.result["curve"]]) for r in x.records)
              for x in (result, serial)]  # fmt: skip
    assert curves[0] == curves[1]  # the same trials, whichever process ran them


def test_cli_bench_and_report_into_tmp_path(tmp_path, capsys):
    db, out = str(tmp_path / "c.db"), str(tmp_path / "out")
    code = main(["bench", "--workloads", REGRESSION, "--algorithms", "nadamw,tiny_workloads:SignDescent",
                 "--trials", "2", "--storage", db, "--out", out])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "benchmark score" in printed and "SignDescent" in printed and f"wrote {out}" in printed
    assert main(["report", "--storage", db, "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "report.html").stat().st_size > 0
    assert len(json.loads((tmp_path / "again" / "results.json").read_text())["trials"]) == 4


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workloads", "no_such_workload"], "no_such_workload"),
        (["--workloads", "nosuchpkg.mod:W"], "nosuchpkg.mod:W"),
        (["--algorithms", "adamz"], "unknown optimizer 'adamz'"),
        (["--algorithms", "torch.optim:Nope"], "cannot import optimizer 'torch.optim:Nope'"),
        (["--storage", "sqlite:////no/such/dir/b.db"], "cannot open the results storage"),
        (["--storage", "postgresql://nobody@127.0.0.1:9/none"], "cannot open the results storage"),
        (["--trials", "0"], "trials must be a positive integer"),
        (["--option", "data_dir"], "--option must be KEY=VALUE"),
    ],
)
def test_bad_input_is_one_message_and_exit_code_2(argv, message, tmp_path, capsys):
    base = ["bench", "--workloads", REGRESSION, "--algorithms", "adamw", "--storage", str(tmp_path / "x.db")]
    assert main(base + argv + ["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_unparsable_search_space_file_is_exit_code_2(tmp_path, capsys):
    space = tmp_path / "broken.toml"
    space.write_text("optimizer = [")
    code = main(["bench", "--workloads", REGRESSION, "--algorithms", str(space), "--storage", str(tmp_path / "x.db")])
    assert code == 2
    err = capsys.readouterr().err
    assert str(space) in err and "does not parse" in err


def test_calibrate_sets_targets_as_algoperf_from_the_baselines(tmp_path):
    targets = tmp_path / "targets.json"
    targets.write_text('{"other": {"target": 1.0, "source": "kept"}}')
    found = calibrate(
        ["tiny_workloads:ShortRegression"], trials=2, studies=3, storage=str(tmp_path / "cal.db"), output=targets
    )
    records = load_records(open_storage(str(tmp_path / "cal.db")), ruleset="calibrate")
    assert len(records) == 4 * 3 * 2 and all(r.result["steps"] == 20 for r in records)  # no early stop
    expected = {}
    for algorithm in ("nadamw", "adamw", "heavy_ball", "nesterov"):
        per_study = sorted(min(r.result["best_metric"] for r in records if (r.algorithm, r.study) == (algorithm, s))
                           for s in range(3))  # fmt: skip
        expected[algorithm] = per_study[1]  # the median of three studies
    written = json.loads(targets.read_text())
    assert written["other"] == {"target": 1.0, "source": "kept"}
    assert written["short_regression"]["target"] == min(expected.values()) == found["short_regression"]["target"]
    assert min(expected, key=expected.get) in written["short_regression"]["source"]


def test_calibrating_a_workload_without_a_finite_metric_is_one_message(tmp_path, capsys):
    targets = tmp_path / "targets.json"
    code = main(["bench", "calibrate", "--workloads", "tiny_workloads:NoMetric", "--trials", "1", "--studies", "1",
                 "--storage", str(tmp_path / "n.db"), "--targets", str(targets)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and not targets.exists()
    assert "calibration of 'tiny_workloads:NoMetric' produced no finite validation metric" in err


def test_a_registered_workload_by_name_through_the_cli(tmp_path, capsys):
    code = main(["bench", "--workloads", "online_convex", "--algorithms", "heavy_ball", "--ruleset", "self",
                 "--storage", str(tmp_path / "o.db"), "--out", str(tmp_path / "o")])  # fmt: skip
    assert code == 0 and "online_convex" in capsys.readouterr().out


def test_report_of_an_empty_storage_is_one_message(tmp_path, capsys):
    assert main(["report", "--storage", str(tmp_path / "empty.db"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "no finished 'external' trials" in err and "Traceback" not in err
