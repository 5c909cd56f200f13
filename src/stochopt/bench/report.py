"""``stochopt report``: Markdown and HTML with PNG plots (validation curves with the target line, performance
profiles), a time-to-target table, and the trials exported as CSV and JSON."""

from __future__ import annotations

import csv
import html
import json
import math
from pathlib import Path
from typing import Any

from stochopt.bench.algorithms import BASELINES
from stochopt.bench.scoring import (
    TAU_MAX,
    Table,
    algorithms_of,
    performance_profile,
    performance_ratios,
    relative_step_cost,
    spread,
    study_speedups,
    summary,
    within_noise,
)
from stochopt.bench.storage import TrialRecord
from stochopt.bench.suite import UNITS, BenchmarkResult
from stochopt.extras import require

BASELINE = BASELINES[0]  # speed-ups are against the first AlgoPerf baseline


UNIT_SUFFIX = {"seconds": " s", "steps": ""}
SHORT_TRIAL = 1.0  # seconds: below this a time to target is within the clock noise of a shared machine
INTRO = (
    "Ruleset: **{ruleset}**; {trials} trials. Each cell: median over studies of the fastest trial's training time "
    "to the validation target, in seconds and (rows marked steps) in steps, with its [min-max] over studies; "
    "`inf`: missed, or slower than 4x the fastest. Score: normalized area under the performance profile on [1, 4] "
    "(AlgoPerf), from seconds and from steps; speed-up: geometric mean of t({baseline}) / t over the workloads "
    "both reached (their number in parentheses), [min-max] over studies paired by index; step cost: seconds per "
    "step relative to {baseline}'s."
)


def _cell(times: list[float], median: float, ratio: float, unit: str) -> str:
    """The median over studies, its min-max over them when there are several, or why it is infinite."""
    if not math.isfinite(median):
        return "inf"
    fmt = (lambda t: f"{t:.2f}") if unit == "seconds" else (lambda t: f"{t:.0f}")
    text = fmt(median) + UNIT_SUFFIX[unit]
    if len(times) > 1:
        low, high = spread(times)
        text += f" [{fmt(low)}-{fmt(high) if math.isfinite(high) else 'inf'}]"
    return text + ("" if math.isfinite(ratio) else f" >{TAU_MAX:g}x: inf")


def _number(x: float, fmt: str = ".3f") -> str:
    return format(x, fmt) if math.isfinite(x) else "-"


def _speedup(value: float, workloads: int, per_study: list[float] | None = None) -> str:
    """The geometric-mean speed-up and the number of workloads it is over, e.g. "1.75x (2)", or "- (0)", with its
    min-max over studies when there are several."""
    if not math.isfinite(value):
        return f"- ({workloads})"
    text = f"{value:.2f}x ({workloads})"
    if per_study and len(per_study) > 1:
        text += f" [{min(per_study):.2f}-{max(per_study):.2f}]"
    return text


def time_rows(result: BenchmarkResult, unit: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per workload and algorithm, the median over studies of the time to target in ``unit``
    (seconds or steps), with its min-max over studies."""
    studies, table = result.studies(unit), result.table(unit)
    algorithms = list(next(iter(table.values()), {}))
    ratios = performance_ratios(table)
    rows = [[w, *(_cell(studies[w][a], table[w][a], ratios[w][a], unit) for a in algorithms)] for w in table]
    return ["workload", *algorithms], rows


def score_rows(result: BenchmarkResult) -> list[list[str]]:
    """Benchmark scores and speed-ups against NAdamW in seconds and in steps, and what a step costs."""
    algorithms = result.algorithms or algorithms_of(result.table())
    rows = []
    for unit in UNITS:
        scores = summary(result.table(unit), BASELINE)
        rows.append([f"benchmark score ({unit})", *(_number(scores[a]["score"]) for a in algorithms)])
    if BASELINE not in algorithms:
        return rows
    for unit in UNITS:
        scores, studies = summary(result.table(unit), BASELINE), result.studies(unit)
        rows.append([f"speed-up vs {BASELINE} ({unit})", *(
            _speedup(scores[a]["speedup"], scores[a]["speedup_workloads"], study_speedups(studies, a, BASELINE))
            for a in algorithms)])  # fmt: skip
    costs = result.step_costs()
    rows.append([f"step cost vs {BASELINE}", *(_speedup(*relative_step_cost(costs, a, BASELINE)) for a in algorithms)])
    return rows


def noise_notes(result: BenchmarkResult) -> list[str]:
    """Where the studies do not settle a ranking: algorithms within noise of a workload's fastest (their
    min-max over studies overlap), and speed-ups whose min-max over studies includes 1."""
    notes = []
    for workload, times in result.table("seconds").items():
        finite = [t for t in times.values() if math.isfinite(t)]
        if finite and max(finite) < SHORT_TRIAL:
            notes.append(f"{workload}: every time to target is under {SHORT_TRIAL:g} s, where a shared machine's clock "
                         "noise is as large as the differences: compare its steps")  # fmt: skip
    for unit in UNITS:
        studies, table = result.studies(unit), result.table(unit)
        for workload, times in table.items():
            finite = {a: t for a, t in times.items() if math.isfinite(t)}
            if len(finite) < 2 or min(len(studies[workload][a]) for a in finite) < 2:
                continue
            best = min(finite, key=finite.get)
            close = [a for a in finite if a != best and within_noise(studies[workload][a], studies[workload][best])]
            if close:
                notes.append(f"{workload} ({unit}): {', '.join(close)} within noise of the fastest, {best}")
        for algorithm in algorithms_of(table):
            gains = study_speedups(studies, algorithm, BASELINE)
            if algorithm != BASELINE and len(gains) > 1 and min(gains) <= 1.0 <= max(gains):
                notes.append(f"{algorithm} vs {BASELINE} ({unit}): within noise, speed-up "
                             f"{min(gains):.2f}-{max(gains):.2f}x over {len(gains)} studies")  # fmt: skip
    return notes


def tables(result: BenchmarkResult) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """(header, time rows, score rows) of the summary: time to target in seconds and in steps per workload and
    algorithm (median [min-max] over studies), then the scores (:func:`score_rows`)."""
    header, seconds = time_rows(result, "seconds")
    _, steps = time_rows(result, "steps")
    return header, [*seconds, *([f"{row[0]} (steps)", *row[1:]] for row in steps)], score_rows(result)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def best_trials(records: list[TrialRecord]) -> dict[str, dict[str, TrialRecord]]:
    """workload -> algorithm -> the trial to draw: the fastest to target, else the lowest validation metric."""
    best: dict[str, dict[str, TrialRecord]] = {}
    for r in records:
        key = (r.seconds, r.result["best_metric"])
        current = best.setdefault(r.workload, {}).get(r.algorithm)
        if current is None or key < (current.seconds, current.result["best_metric"]):
            best[r.workload][r.algorithm] = r
    return best


FAILURE_HEADER = ["workload", "algorithm", "study", "trial", "step", "why it failed"]


def failure_rows(records: list[TrialRecord]) -> list[list[str]]:
    """One row per failed trial (it raised, its process died twice, or its loss or metric went non-finite)."""
    rows = []
    for r in records:
        if r.result.get("failed"):
            reason = str(r.result.get("reason", ""))
            rows.append([r.workload, r.algorithm, str(r.study), str(r.trial), str(r.result.get("steps", "")), reason])
    return rows


def plot_curves(records: list[TrialRecord], workload: str, path: Path, algorithms: list[str]) -> None:
    """Validation metric against training seconds, one line per algorithm (its best trial), the target dashed."""
    require("matplotlib", feature="the benchmark report's plots", extra="bench")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    chosen = best_trials(records).get(workload, {})
    values = []
    for index, algorithm in enumerate(algorithms):
        if algorithm not in chosen:
            continue
        r = chosen[algorithm]
        curve = [(s, m) for _, s, m in r.result["curve"] if math.isfinite(m)]
        if curve:
            ax.plot(*zip(*curve), marker=".", label=algorithm, color=f"C{index}")
            values += [m for _, m in curve]
    target = next((r.target for r in records if r.workload == workload and r.target is not None), None)
    if target is not None:
        ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target:.4g}")
    if values and min(values) > 0 and max(values) / min(values) > 30:
        ax.set_yscale("log")
    metric = next((r.metric for r in records if r.workload == workload), "metric")
    ax.set(xlabel="training time (s, evaluation excluded)", ylabel=metric, title=workload)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)


def plot_profiles(tables_by_unit: dict[str, Table], path: Path) -> None:
    """rho_a(tau) on [1, 4] for every algorithm, one panel per unit (seconds, steps): the fraction of workloads
    within tau of the fastest."""
    require("matplotlib", feature="the benchmark report's plots", extra="bench")
    from matplotlib.figure import Figure

    taus = [1 + (TAU_MAX - 1) * i / 300 for i in range(301)]
    fig = Figure(figsize=(6.4 * len(tables_by_unit), 4.0), layout="constrained")
    axes = fig.subplots(1, len(tables_by_unit), squeeze=False)[0]
    for ax, (unit, table) in zip(axes, tables_by_unit.items()):
        ratios = performance_ratios(table)
        for index, algorithm in enumerate(next(iter(table.values()), {})):
            profile = performance_profile(ratios, algorithm, taus)
            ax.step(taus, profile, where="post", label=algorithm, color=f"C{index}")
        ax.set(xlabel=f"tau ({unit} to target relative to the fastest)", ylabel="fraction of workloads",
               ylim=(-0.02, 1.02), xlim=(1, TAU_MAX), title=f"performance profiles, {unit}")  # fmt: skip
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)


def export(result: BenchmarkResult, out: Path) -> dict[str, Any]:
    """results.csv (one row per trial) and results.json (tables, scores, trials with curves)."""
    fields = ["ruleset", "workload", "algorithm", "seed", "study", "trial", "seconds_to_target", "steps_to_target",
              "best_metric", "steps", "train_seconds", "eval_seconds", "failed", "reason", "point"]  # fmt: skip
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for r in result.records:
            res = r.result
            head = [r.ruleset, r.workload, r.algorithm, r.seed, r.study, r.trial]
            writer.writerow([*head, *(res[k] for k in fields[6:14]), json.dumps(r.point)])
    seconds = result.table("seconds")

    def clean(x: Any) -> Any:  # JSON has no inf: null means "missed"
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    data = {
        "ruleset": result.ruleset, "seconds_to_target": seconds, "steps_to_target": result.table("steps"),
        "summary": summary(seconds, BASELINE), "summary_steps": summary(result.table("steps"), BASELINE),
        "step_cost_vs_baseline": {a: relative_step_cost(result.step_costs(), a, BASELINE)[0]
                                  for a in algorithms_of(seconds)},
        "within_noise": noise_notes(result),
        "trials": [{**{k: getattr(r, k) for k in fields[:6]}, "point": r.point, "result": r.result, "target": r.target}
                   for r in result.records],
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(clean(data), indent=1))
    return data


def write_report(result: BenchmarkResult, out: str | Path) -> Path:
    """Write report.md, report.html, the PNGs, results.csv and results.json into ``out``; returns report.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not result.records:
        raise ValueError("no finished trials to report (run `stochopt bench` first, with the same --storage)")
    export(result, out)
    header, rows, scores = tables(result)
    seconds = result.table("seconds")
    plot_profiles({unit: result.table(unit) for unit in UNITS}, out / "profiles.png")
    images = []
    for workload in seconds:
        name = f"curves_{workload.replace(':', '_').replace('.', '_').replace('/', '_')}.png"
        plot_curves(result.records, workload, out / name, header[1:])
        images.append((workload, name))
    intro = INTRO.format(ruleset=result.ruleset, trials=len(result.records), baseline=BASELINE)
    notes = noise_notes(result)
    md = ["# stochopt benchmark report", "", intro, "", "## Time to target", "", markdown_table(header, rows), "",
          "## Scores", "", markdown_table(["", *header[1:]], scores), "",
          *(["## Within noise", "", *(f"- {n}" for n in notes), ""] if notes else []),
          "## Performance profiles", "", "![performance profiles](profiles.png)", "",
          "## Validation curves", ""]  # fmt: skip
    md += [f"![{w}]({name})\n" for w, name in images]
    failures = failure_rows(result.records)
    if failures:  # a failed trial counts as infinitely slow; here is why each failed (the traceback: results.json)
        escaped = [[cell.replace("|", "\\|") for cell in row] for row in failures]
        md += ["## Failed trials", "", markdown_table(FAILURE_HEADER, escaped), ""]
    md += ["Data: [results.csv](results.csv), [results.json](results.json)", ""]
    (out / "report.md").write_text("\n".join(md))

    def html_table(head: list[str], body: list[list[str]]) -> str:
        cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
        return f"<table><tr>{cells}</tr>{trs}</table>"

    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>stochopt benchmark report</title><style>"
        "body{font-family:sans-serif;max-width:60em;margin:auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}</style></head><body>"
        f"<h1>stochopt benchmark report</h1><p>{html.escape(intro.replace('**', '').replace('`', ''))}</p>"
        f"<h2>Time to target</h2>{html_table(header, rows)}<h2>Scores</h2>{html_table(['', *header[1:]], scores)}"
        + ("<h2>Within noise</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>" if notes
           else "")
        + "<h2>Performance profiles</h2><img src='profiles.png' alt='performance profiles'>"
        "<h2>Validation curves</h2>" + "".join(f"<img src='{n}' alt='{html.escape(w)}'>" for w, n in images)
        + (f"<h2>Failed trials</h2>{html_table(FAILURE_HEADER, failures)}" if failures else "")
        + "<p>Data: <a href='results.csv'>results.csv</a>, <a href='results.json'>results.json</a></p></body></html>"
    )  # fmt: skip
    (out / "report.html").write_text(page)
    return out / "report.md"
