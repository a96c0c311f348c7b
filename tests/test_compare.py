"""Predicted-vs-measured statistics: Kendall tau, relative error, exit-layer histograms."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from testbed.compare import (
    COMPARED_METRICS,
    error_rows,
    exit_histogram,
    kendall_tau,
    noise_floor,
    noise_rows,
    relative_error,
    resolved_pairs,
    total_variation,
)


def test_kendall_tau_of_same_and_reversed_orders():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0


def test_kendall_tau_counts_one_swap():
    # 4 items, one adjacent pair swapped: 5 concordant, 1 discordant of 6 pairs
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)


def test_kendall_tau_b_with_ties_matches_the_textbook_formula():
    # x has one tied pair; tau-b = (C - D) / sqrt((n0 - n1)(n0 - n2)) with n0 = 6, n1 = 1, n2 = 0
    a, b = [1, 1, 2, 3], [1, 2, 3, 4]
    assert kendall_tau(a, b) == pytest.approx(5 / (5 * 6) ** 0.5)


def test_kendall_tau_over_chosen_pairs_only():
    # the swapped pair (1, 2) left out: the rest agree
    pairs = [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4], pairs) == 1.0
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4], [(1, 2)]) == -1.0


def test_resolved_pairs_are_those_most_rounds_order_alike():
    runs = [
        [10, 10, 10, 10, 10],
        [11, 12, 11, 9, 12],  # above item 0 in 4 of 5 rounds
        [11, 9, 11, 9, 10],  # against item 0: 2 above, 2 below; against 1: 2 below, 3 ties
        [5, 6, 5, 6, 5],  # below everything in every round
    ]
    assert resolved_pairs(runs) == [(0, 1), (0, 3), (1, 3), (2, 3)]
    assert resolved_pairs(runs, min_share=1.0) == [(0, 3), (1, 3), (2, 3)]
    assert resolved_pairs([[1, 2], [2, 1]]) == []  # fewer than 3 rounds: none


def test_kendall_tau_undefined_cases():
    assert kendall_tau([1.0], [2.0]) is None
    assert kendall_tau([1, 1, 1], [1, 2, 3]) is None  # a constant scoring has no order
    with pytest.raises(ValueError):
        kendall_tau([1, 2], [1, 2, 3])


@given(st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=8, unique=True))
def test_kendall_tau_is_one_against_itself_and_symmetric_in_sign(xs):
    assert kendall_tau(xs, xs) == pytest.approx(1.0)
    assert kendall_tau(xs, [-x for x in xs]) == pytest.approx(-1.0)


@given(st.permutations(range(5)))
def test_kendall_tau_equals_pair_count_without_ties(perm):
    pairs = list(itertools.combinations(range(5), 2))
    concordant = sum((perm[i] < perm[j]) for i, j in pairs)
    expected = (concordant - (len(pairs) - concordant)) / len(pairs)
    assert kendall_tau(list(range(5)), list(perm)) == pytest.approx(expected)


def test_relative_error():
    assert relative_error(110.0, 100.0) == pytest.approx(0.10)
    assert relative_error(90.0, 100.0) == pytest.approx(-0.10)
    assert relative_error(None, 1.0) is None
    assert relative_error(1.0, 0.0) is None


def test_error_rows_scale_to_display_units():
    pred = {"throughput_tokens_per_s": 110.0, "tpot_mean_s": 0.012}
    real = {"throughput_tokens_per_s": 100.0, "tpot_mean_s": 0.010}
    rows = {r.metric: r for r in error_rows("p", pred, real)}
    assert set(rows) == {key for key, _, _ in COMPARED_METRICS}
    assert rows["tpot_mean_s"].predicted == pytest.approx(12.0)  # milliseconds
    assert rows["tpot_mean_s"].error == pytest.approx(0.2)
    assert rows["ttft_mean_s"].error is None  # missing on both sides


def test_exit_histogram_and_total_variation():
    h = exit_histogram([4, 4, 5, 8], 8)
    assert h == [0, 0, 0, 0.5, 0.25, 0, 0, 0.25]
    assert total_variation(h, h) == 0
    assert total_variation([1, 0], [0, 1]) == 1
    assert total_variation([0.5, 0.5], [1, 0]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        exit_histogram([9], 8)
    with pytest.raises(ValueError):
        total_variation([1], [0.5, 0.5])


def test_noise_floor_is_the_rounds_mad_over_median_and_their_range():
    floor = noise_floor([100.0, 110.0, 90.0, None, 104.0])
    assert floor["median"] == 102.0 and floor["low"] == 90.0 and floor["high"] == 110.0
    assert floor["mad_rel"] == pytest.approx(5.0 / 102.0)  # deviations 2, 8, 12, 2: median 5
    assert noise_floor([5.0])["mad_rel"] is None  # one round: the spread is unknown
    assert noise_floor([None])["median"] is None


def test_noise_rows_say_whether_the_forecast_lies_inside_the_rounds():
    runs = [{"throughput_tokens_per_s": v, "tpot_mean_s": t}
            for v, t in ((100.0, 0.10), (104.0, 0.11), (96.0, 0.09))]  # fmt: skip
    rows = noise_rows("p", runs, {"throughput_tokens_per_s": 110.0, "tpot_mean_s": 0.1},
                      {"throughput_tokens_per_s": 101.0, "tpot_mean_s": 0.2})  # fmt: skip
    tp, tpot = rows
    assert (tp.forecast_inside, tp.hindsight_inside) == (False, True)
    assert tp.error_over_noise == pytest.approx(0.10 / 0.04)  # 10% off, MAD 4%
    assert (tpot.forecast_inside, tpot.hindsight_inside) == (True, False)
    assert noise_rows("p", runs, {}, None)[0].forecast_inside is None
