"""Scoring against profiles and scores worked out by hand on small made-up tables, infinities included."""

import math

import pytest

from stochopt.bench.scoring import (
    benchmark_score,
    median_over_studies,
    performance_profile,
    performance_ratios,
    relative_step_cost,
    speedup,
    spread,
    study_speedups,
    study_time,
    summary,
    within_noise,
)

INF = math.inf
# three workloads, three algorithms; times in seconds
TABLE = {
    "w1": {"a": 10.0, "b": 20.0, "c": 50.0},  # ratios 1, 2, 5 -> c is beyond 4x: inf
    "w2": {"a": INF, "b": 30.0, "c": 15.0},  # ratios inf, 2, 1
    "w3": {"a": 8.0, "b": 8.0, "c": INF},  # ratios 1, 1, inf
}


def test_ratios_by_hand():
    r = performance_ratios(TABLE)
    assert r["w1"] == {"a": 1.0, "b": 2.0, "c": INF}
    assert r["w2"] == {"a": INF, "b": 2.0, "c": 1.0}
    assert r["w3"] == {"a": 1.0, "b": 1.0, "c": INF}


def test_exactly_four_times_the_best_still_counts():
    r = performance_ratios({"w": {"a": 1.0, "b": 4.0, "c": 4.0000001}})
    assert r["w"] == {"a": 1.0, "b": 4.0, "c": INF}


def test_profiles_by_hand():
    r = performance_ratios(TABLE)
    taus = [1.0, 1.5, 2.0, 3.9, 4.0]
    assert performance_profile(r, "a", taus) == [2 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3]
    assert performance_profile(r, "b", taus) == [1 / 3, 1 / 3, 1.0, 1.0, 1.0]
    assert performance_profile(r, "c", taus) == [1 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3]


def test_scores_by_hand():
    r = performance_ratios(TABLE)
    # area of rho on [1, 4] / 3: a: 2/3 over the whole interval; b: 1/3 on [1, 2) then 1 on [2, 4] -> (1/3 + 2) / 3
    assert benchmark_score(r, "a") == pytest.approx(2 / 3)
    assert benchmark_score(r, "b") == pytest.approx((1 / 3 + 2) / 3)
    assert benchmark_score(r, "c") == pytest.approx(1 / 3)


def test_score_matches_a_riemann_sum_of_the_profile():
    table = {"w1": {"a": 1.0, "b": 1.7}, "w2": {"a": 3.1, "b": 1.0}, "w3": {"a": INF, "b": 2.2}}
    r = performance_ratios(table)
    n = 30000
    taus = [1 + 3 * (i + 0.5) / n for i in range(n)]
    for algorithm in "ab":
        riemann = sum(performance_profile(r, algorithm, taus)) / n
        assert benchmark_score(r, algorithm) == pytest.approx(riemann, abs=1e-4)


def test_fastest_everywhere_scores_one_and_never_within_4x_scores_zero():
    table = {"w1": {"a": 1.0, "b": 9.0}, "w2": {"a": 2.0, "b": INF}}
    r = performance_ratios(table)
    assert benchmark_score(r, "a") == 1.0
    assert benchmark_score(r, "b") == 0.0


def test_workload_nobody_solves_counts_against_everyone():
    r = performance_ratios({"w1": {"a": 1.0}, "w2": {"a": INF}})
    assert r["w2"]["a"] == INF
    assert benchmark_score(r, "a") == 0.5


def test_speedup_geometric_mean_over_workloads_both_reached():
    # nadamw/a: w1 20/10 = 2, w2 12/24 = 0.5, w3 a missed -> left out; geometric mean of (2, 0.5) = 1
    table = {
        "w1": {"nadamw": 20.0, "a": 10.0, "b": 5.0},
        "w2": {"nadamw": 12.0, "a": 24.0, "b": 3.0},
        "w3": {"nadamw": 9.0, "a": INF, "b": 1.0},
    }
    assert speedup(table, "a") == (pytest.approx(1.0), 2)
    assert speedup(table, "b") == (pytest.approx((4 * 4 * 9) ** (1 / 3)), 3)
    value, count = speedup({"w": {"nadamw": INF, "a": 1.0}}, "a")
    assert math.isnan(value) and count == 0
    s = summary(table)
    assert s["b"]["speedup"] == pytest.approx(144 ** (1 / 3)) and s["a"]["reached"] == 2


def test_study_and_median_reductions_with_infinities():
    assert study_time([5.0, INF, 3.0]) == 3.0
    assert study_time([INF, INF]) == INF
    assert median_over_studies([3.0, 1.0, INF]) == 3.0
    assert median_over_studies([1.0, INF, INF]) == INF
    assert median_over_studies([1.0, 3.0]) == 2.0
    assert median_over_studies([1.0, INF]) == INF


# ----- spread over studies, paired speed-ups, step-based scores and step costs, by hand ----------------------------
# two workloads, three studies each (study i of every algorithm shares its trial seeds); seconds and steps
STUDIES_S = {
    "w1": {"nadamw": [2.0, 4.0, 3.0], "fast": [1.0, 1.0, 1.5], "close": [2.5, 3.5, 4.5]},
    "w2": {"nadamw": [10.0, 10.0, 10.0], "fast": [5.0, INF, 5.0], "close": [9.0, 11.0, 10.0]},
}


def test_paired_speedups_per_study_by_hand():
    # study 0: sqrt(2/1 * 10/5) = 2; study 1: only w1 (fast missed w2): 4/1 = 4; study 2: sqrt(3/1.5 * 10/5) = 2
    assert study_speedups(STUDIES_S, "fast", "nadamw") == pytest.approx([2.0, 4.0, 2.0])
    close = study_speedups(STUDIES_S, "close", "nadamw")
    assert close == pytest.approx([math.sqrt(2 / 2.5 * 10 / 9), math.sqrt(4 / 3.5 * 10 / 11), math.sqrt(3 / 4.5)])
    assert min(close) < 1.0 < max(close)  # its speed-up range includes 1: within noise
    assert study_speedups({"w": {"nadamw": [INF], "fast": [1.0]}}, "fast", "nadamw") == []


def test_within_noise_is_overlap_of_finite_ranges():
    assert within_noise([2.5, 3.5, 4.5], [2.0, 4.0, 3.0])
    assert not within_noise([1.0, 1.0, 1.5], [2.0, 4.0, 3.0])
    assert not within_noise([5.0, INF, 5.0], [10.0, 10.0, 10.0])  # a missed study: not a finite range
    assert spread([3.0, 1.0, 2.0]) == (1.0, 3.0) and spread([]) == (INF, INF)


def test_relative_step_cost_by_hand():
    costs = {"w1": {"nadamw": 0.002, "muon": 0.004}, "w2": {"nadamw": 0.001, "muon": 0.004}}
    ratio, n = relative_step_cost(costs, "muon", "nadamw")
    assert n == 2 and ratio == pytest.approx(math.sqrt(2 * 4))


def test_step_and_second_scores_can_rank_differently():
    """A dear-per-step algorithm (fewer steps, more seconds) wins in steps and loses in seconds, as AlgoPerf's
    v0.6 analysis found for Muon: both rankings are computed from one set of trials, by hand here."""
    seconds = {"w1": {"a": 1.0, "b": 2.0}, "w2": {"a": 1.0, "b": 1.5}}
    steps = {"w1": {"a": 400.0, "b": 200.0}, "w2": {"a": 300.0, "b": 300.0}}
    assert benchmark_score(performance_ratios(seconds), "a") == 1.0
    assert benchmark_score(performance_ratios(seconds), "b") == pytest.approx(((4 - 2) + (4 - 1.5)) / 3 / 2)
    assert benchmark_score(performance_ratios(steps), "b") == 1.0
    assert benchmark_score(performance_ratios(steps), "a") == pytest.approx(((4 - 2) + (4 - 1)) / 3 / 2)
    assert performance_profile(performance_ratios(steps), "a", [1.0, 2.0]) == [0.5, 1.0]
