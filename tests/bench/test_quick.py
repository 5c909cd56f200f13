"""``stochopt bench --quick`` end to end with its own ruleset, algorithms and studies on tiny workloads: what it
says it ran, a spread in every cell, scores in seconds and in steps, step costs and the report."""

import json
import math

from stochopt.bench import suite
from stochopt.bench.workloads import WORKLOADS
from stochopt.cli import main

REGRESSION, CLASSIFIER = "tiny_workloads:TinyRegression", "tiny_workloads:TinyClassifier"


def test_the_quick_preset_names_what_exists():
    assert set(suite.QUICK["workloads"]) <= set(WORKLOADS)
    assert suite.QUICK["ruleset"] == "self" and suite.QUICK["studies"] >= 3  # a spread over seeds in every cell
    assert "nadamw" in suite.QUICK["algorithms"]  # the baseline of the speed-ups


def test_quick_end_to_end_on_tiny_workloads(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(suite.QUICK, "workloads", [REGRESSION, CLASSIFIER])
    out = tmp_path / "report"
    assert main(["bench", "--quick", "--storage", str(tmp_path / "q.db"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == suite.QUICK["why"]
    md = (out / "report.md").read_text()
    rows = ["benchmark score (seconds)", "benchmark score (steps)", "speed-up vs nadamw (seconds)",
            "speed-up vs nadamw (steps)", "step cost vs nadamw", f"{REGRESSION} (steps)"]  # fmt: skip
    for row in rows:
        assert f"| {row} |" in md, row
    # the summary table on the terminal, its brackets printed as text (not swallowed as rich markup)
    assert "median [min-max] over studies" in printed and "nadamw" in printed
    data = json.loads((out / "results.json").read_text())
    algorithms, studies = suite.QUICK["algorithms"], suite.QUICK["studies"]
    assert len(data["trials"]) == 2 * len(algorithms) * studies  # self-tuning: one trial per study
    assert {t["study"] for t in data["trials"]} == set(range(studies))
    assert set(data["summary_steps"]) == set(algorithms) and data["step_cost_vs_baseline"]["nadamw"] == 1.0
    # each cell with a finite median shows its min-max over the three studies
    reached = [v for row in data["steps_to_target"].values() for v in row.values() if v is not None]
    assert reached and md.count(" [") >= len(reached)
    for t in data["trials"]:  # three times the tiny workloads' budgets, AlgoPerf's self-tuning rule
        assert t["result"]["steps"] <= 3 * (60 if "Regression" in t["workload"] else 40)
    assert math.isfinite(min(v for row in data["steps_to_target"].values() for v in row.values() if v is not None))
