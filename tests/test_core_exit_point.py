"""The one exit-point protocol every runner uses (testbed.core.exit_point)."""

from __future__ import annotations

import numpy as np

from testbed.core.exit_point import RowExits, StepCounters, exit_point, is_exit_layer
from testbed.core.policy_set import PolicyConfig, build_policies

L = 8


class Fixed:
    """A signal source with one value per row; records what it was asked."""

    def __init__(self, values):
        self.values, self.asked = np.asarray(values, dtype=float), []

    def signal(self, layer, rows, name):
        self.asked.append((layer, rows.tolist(), name))
        return self.values[rows]


def _point(policy: PolicyConfig, rows: RowExits, source, layer=4, eligible=None):
    n = len(rows.token)
    counters = StepCounters()
    outcome = exit_point(
        build_policies(policy), layer, L, rows,
        eligible=np.ones(n, dtype=bool) if eligible is None else eligible,
        positions=np.zeros(n, dtype=np.int64), max_tokens=np.full(n, 16), counters=counters,
        source=source,
    )  # fmt: skip
    return outcome, counters


def test_shrink_stops_the_confident_rows_and_asks_only_rows_without_a_token():
    policy = PolicyConfig(batching="shrink", exit_rule="hidden", threshold=0.9, min_exit_layer=2)
    rows = RowExits.start(4, L)
    source = Fixed([0.95, 0.5, 0.99, 0.1])
    outcome, counters = _point(policy, rows, source, eligible=np.array([True, True, True, False]))
    assert outcome.takers.tolist() == [0, 2] and outcome.stopping.tolist() == [0, 2]
    assert source.asked == [(4, [0, 1, 2], "hidden_cosine")]
    assert rows.is_running.tolist() == [False, True, False, True]
    assert rows.executed.tolist() == [4, L, 4, L]
    assert (counters.rule_evals, counters.exit_points, counters.forced) == (3, 1, 0)
    rows.take(outcome.takers.tolist(), 4, [7, 9])
    assert rows.result(0, seq_id=10).token_id == 7 and rows.result(0, seq_id=10).exit_layer == 4
    assert rows.untaken([True] * 4).tolist() == [1, 3]  # they take the final layer's token


def test_consensus_keeps_the_batch_running_and_a_row_with_a_token_is_not_asked_again():
    policy = PolicyConfig(batching="consensus", exit_rule="hidden", threshold=0.9, min_exit_layer=2)
    rows = RowExits.start(2, L)
    rows.take([0], 3, [5])
    source = Fixed([0.99, 0.5])
    outcome, _ = _point(policy, rows, source)
    assert outcome.takers.tolist() == [] and outcome.stopping.tolist() == []
    assert source.asked == [(4, [1], "hidden_cosine")]
    assert rows.is_running.all()


def test_quorum_forces_the_rest_out_and_counts_them():
    policy = PolicyConfig(batching="quorum", batching_params=(("fraction", 0.5),),
                          exit_rule="hidden", threshold=0.9, min_exit_layer=2)  # fmt: skip
    rows = RowExits.start(4, L)
    outcome, counters = _point(policy, rows, Fixed([0.95, 0.99, 0.1, 0.2]))
    assert sorted(outcome.takers.tolist()) == [0, 1, 2, 3]
    assert rows.is_forced.tolist() == [False, False, True, True] and counters.forced == 2


def test_rebatch_parks_a_small_continuing_group():
    policy = PolicyConfig(batching="rebatch", exit_rule="hidden", threshold=0.9, min_exit_layer=2)
    rows = RowExits.start(4, L)
    outcome, _ = _point(policy, rows, Fixed([0.95, 0.99, 0.97, 0.1]))
    assert outcome.stopping.tolist() == [0, 1, 2, 3] and outcome.takers.tolist() == [0, 1, 2]
    assert rows.parked_layer == [None, None, None, 4]
    rows.take(outcome.takers.tolist(), 4, [1, 2, 3])
    result = rows.result(3, seq_id=3)
    assert result.is_parked and result.token_id is None and rows.untaken([True] * 4).size == 0


def test_no_exit_point_below_the_first_layer_at_the_last_layer_or_under_full():
    early = build_policies(PolicyConfig(batching="shrink", min_exit_layer=3))
    assert not is_exit_layer(early, 2, L) and is_exit_layer(early, 3, L)
    assert not is_exit_layer(early, L, L)
    assert not is_exit_layer(build_policies(PolicyConfig()), 4, L)
    rows = RowExits.start(2, L)
    outcome, counters = _point(PolicyConfig(), rows, Fixed([1.0, 1.0]))
    assert outcome is None and counters == StepCounters()
