"""Scoring against profiles and scores worked out by hand on small made-up tables, infinities included."""

import math

import pytest

from stochopt.bench.scoring import (
    benchmark_score,
    median_over_studies,
    performance_profile,
    performance_ratios,
    speedup,
    study_time,
    summary,
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
