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
from stochopt.bench.scoring import TAU_MAX, Table, performance_profile, performance_ratios, summary
from stochopt.bench.storage import TrialRecord
from stochopt.bench.suite import BenchmarkResult

BASELINE = BASELINES[0]  # speed-ups are against the first AlgoPerf baseline


def _seconds(t: float, steps: float, ratio: float) -> str:
    if not math.isfinite(t):
        return "inf"
    return f"{t:.2f} s ({int(steps)})" + ("" if math.isfinite(ratio) else f" >{TAU_MAX:g}x: inf")


def _number(x: float, fmt: str = ".3f") -> str:
    return format(x, fmt) if math.isfinite(x) else "-"


def _speedup(value: float, workloads: int) -> str:
    """The geometric-mean speed-up and the number of workloads it is over, e.g. "1.75x (2)", or "- (0)"."""
    return f"{value:.2f}x ({workloads})" if math.isfinite(value) else f"- ({workloads})"


def tables(result: BenchmarkResult) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """(header, time rows, score rows) of the summary: time to target (steps) per workload and algorithm, then the
    benchmark score and the geometric-mean speed-up against NAdamW per algorithm."""
    seconds, steps = result.table("seconds"), result.table("steps")
    algorithms = list(next(iter(seconds.values()), {}))
    header = ["workload", *algorithms]
    ratios = performance_ratios(seconds)
    rows = [[w, *(_seconds(seconds[w][a], steps[w][a], ratios[w][a]) for a in algorithms)] for w in seconds]
    scores = summary(seconds, BASELINE)
    score_rows = [["benchmark score", *(_number(scores[a]["score"]) for a in algorithms)]]
    if BASELINE in algorithms:
        gains = [_speedup(scores[a]["speedup"], scores[a]["speedup_workloads"]) for a in algorithms]
        score_rows.append([f"speed-up vs {BASELINE}", *gains])
    return header, rows, score_rows


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


def plot_curves(records: list[TrialRecord], workload: str, path: Path, algorithms: list[str]) -> None:
    """Validation metric against training seconds, one line per algorithm (its best trial), the target dashed."""
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


def plot_profiles(table: Table, path: Path) -> None:
    """rho_a(tau) on [1, 4] for every algorithm: the fraction of workloads within tau of the fastest."""
    from matplotlib.figure import Figure

    ratios = performance_ratios(table)
    taus = [1 + (TAU_MAX - 1) * i / 300 for i in range(301)]
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for index, algorithm in enumerate(next(iter(table.values()), {})):
        ax.step(taus, performance_profile(ratios, algorithm, taus), where="post", label=algorithm, color=f"C{index}")
    ax.set(xlabel="tau (time relative to the fastest)", ylabel="fraction of workloads", ylim=(-0.02, 1.02),
           xlim=(1, TAU_MAX), title="performance profiles")  # fmt: skip
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
        "summary": summary(seconds, BASELINE),
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
    header, rows, score_rows = tables(result)
    seconds = result.table("seconds")
    plot_profiles(seconds, out / "profiles.png")
    images = []
    for workload in seconds:
        name = f"curves_{workload.replace(':', '_').replace('.', '_').replace('/', '_')}.png"
        plot_curves(result.records, workload, out / name, header[1:])
        images.append((workload, name))
    intro = (
        f"Ruleset: **{result.ruleset}**; {len(result.records)} trials. Each cell: median over studies of the "
        "fastest trial's training time to the validation target (steps in parentheses); `inf`: missed, or slower "
        "than 4x the fastest. Score: normalized area under the performance profile on [1, 4] (AlgoPerf); speed-up: "
        f"geometric mean of t({BASELINE}) / t over the workloads both reached (their number in parentheses)."
    )
    md = ["# stochopt benchmark report", "", intro, "", "## Time to target", "", markdown_table(header, rows), "",
          "## Scores", "", markdown_table(["", *header[1:]], score_rows), "", "## Performance profiles", "",
          "![performance profiles](profiles.png)", "", "## Validation curves", ""]  # fmt: skip
    md += [f"![{w}]({name})\n" for w, name in images]
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
        f"<h2>Time to target</h2>{html_table(header, rows)}<h2>Scores</h2>{html_table(['', *header[1:]], score_rows)}"
        "<h2>Performance profiles</h2><img src='profiles.png' alt='performance profiles'>"
        "<h2>Validation curves</h2>" + "".join(f"<img src='{n}' alt='{html.escape(w)}'>" for w, n in images)
        + "<p>Data: <a href='results.csv'>results.csv</a>, <a href='results.json'>results.json</a></p></body></html>"
    )  # fmt: skip
    (out / "report.html").write_text(page)
    return out / "report.md"
