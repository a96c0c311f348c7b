"""Batching policies: behaviour on hand-made masks and BatchDecision invariants on random ones."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies import (
    BatchDecision,
    ConsensusBatching,
    FullBatching,
    PolicyConfigError,
    QuorumBatching,
    RebatchBatching,
    ShrinkBatching,
    SkipDecodeBatching,
)


def _b(*values: int) -> np.ndarray:
    return np.array(values, dtype=bool)


def _decide(policy, confident, has_token=None, *, layer=2, num_layers=8, positions=None):
    rows = len(confident)
    return policy.decide(
        layer=layer,
        num_layers=num_layers,
        confident=confident,
        has_token=np.zeros(rows, dtype=bool) if has_token is None else has_token,
        positions=np.zeros(rows, dtype=int) if positions is None else positions,
    )


# ---- hand-made masks ----------------------------------------------------------------------------


def test_full_never_exits():
    decision = _decide(FullBatching(), _b(1, 1, 1))
    assert not decision.take_token.any() and decision.keep_running.all() and not decision.stop
    assert not FullBatching.is_early_exit and not FullBatching.needs_signals
    assert ConsensusBatching.is_early_exit and SkipDecodeBatching.is_early_exit


def test_consensus_keeps_exited_rows_running():
    decision = _decide(ConsensusBatching(), _b(1, 0, 1), has_token=_b(0, 0, 0))
    assert decision.take_token.tolist() == [True, False, True]
    assert decision.keep_running.all() and not decision.stop
    assert not decision.is_forced.any()


def test_consensus_ignores_confident_for_rows_with_a_token_and_stops_when_all_done():
    decision = _decide(ConsensusBatching(), _b(1, 1, 0), has_token=_b(1, 0, 1))
    assert decision.take_token.tolist() == [False, True, False]
    assert decision.stop and not decision.keep_running.any()


def test_quorum_forces_the_rest_once_fraction_is_reached():
    # 3 of 5 rows hold a token (one from earlier, two new) >= 0.6.
    decision = _decide(QuorumBatching(fraction=0.6), _b(0, 1, 1, 0, 0), has_token=_b(1, 0, 0, 0, 0))
    assert decision.stop and not decision.keep_running.any()
    assert decision.take_token.tolist() == [False, True, True, True, True]
    assert decision.is_forced.tolist() == [False, False, False, True, True]


def test_quorum_below_fraction_runs_on_like_consensus():
    decision = _decide(QuorumBatching(fraction=0.6), _b(0, 1, 0, 0, 0))
    assert decision.take_token.tolist() == [False, True, False, False, False]
    assert decision.keep_running.all() and not decision.stop


def test_quorum_fraction_is_an_exact_ratio():
    confident = np.zeros(10, dtype=bool)
    confident[:3] = True  # 3/10 must meet 0.3 although 0.3 * 10 > 3 in floating point
    assert _decide(QuorumBatching(fraction=0.3), confident).stop


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.01, float("nan")])
def test_quorum_rejects_bad_fraction(fraction):
    with pytest.raises(PolicyConfigError, match="fraction"):
        QuorumBatching(fraction=fraction)


def test_shrink_lets_confident_rows_leave():
    decision = _decide(ShrinkBatching(), _b(1, 0, 1, 0))
    assert decision.take_token.tolist() == [True, False, True, False]
    assert decision.keep_running.tolist() == [False, True, False, True]
    assert not decision.stop
    assert _decide(ShrinkBatching(), _b(1, 1)).stop


def test_rebatch_parks_a_small_continuing_group():
    decision = _decide(RebatchBatching(park_below_fraction=0.5), _b(1, 1, 1, 0))
    assert decision.take_token.tolist() == [True, True, True, False]
    assert decision.park.tolist() == [False, False, False, True]
    assert decision.stop and not decision.keep_running.any()


def test_rebatch_runs_a_large_continuing_group():
    decision = _decide(RebatchBatching(park_below_fraction=0.5), _b(1, 0, 0, 0))
    assert decision.keep_running.tolist() == [False, True, True, True]
    assert not decision.park.any() and not decision.stop


def test_rebatch_with_nobody_continuing_just_stops():
    decision = _decide(RebatchBatching(), _b(1, 1))
    assert decision.stop and not decision.park.any() and decision.take_token.all()


def test_rebatch_should_resume():
    policy = RebatchBatching(min_deep_rows=4, max_wait_steps=8)
    assert not policy.should_resume(num_parked=3, oldest_wait_steps=7)
    assert policy.should_resume(num_parked=4, oldest_wait_steps=0)
    assert policy.should_resume(num_parked=1, oldest_wait_steps=8)
    assert not policy.should_resume(num_parked=0, oldest_wait_steps=100)


@pytest.mark.parametrize("policy_cls", [FullBatching, ConsensusBatching, ShrinkBatching])
def test_other_policies_always_resume(policy_cls):
    assert policy_cls().should_resume(num_parked=0, oldest_wait_steps=0)


@pytest.mark.parametrize(
    "kwargs", [{"park_below_fraction": 1.5}, {"min_deep_rows": 0}, {"max_wait_steps": -1}]
)
def test_rebatch_rejects_bad_params(kwargs):
    with pytest.raises(PolicyConfigError, match="rebatch"):
        RebatchBatching(**kwargs)


def test_skipdecode_schedule_values():
    policy = SkipDecodeBatching(max_tokens=10, min_layer=4)
    # L = 12: 12 - floor(8 t / 10)
    assert [policy.target_layer([t], 12) for t in (0, 1, 5, 9, 10, 50)] == [12, 12, 8, 5, 4, 4]


@given(
    max_tokens=st.integers(1, 200),
    min_layer=st.integers(1, 40),
    num_layers=st.integers(2, 40),
)
def test_skipdecode_target_never_rises_and_stays_in_range(max_tokens, min_layer, num_layers):
    policy = SkipDecodeBatching(max_tokens=max_tokens, min_layer=min_layer)
    targets = policy.target_layers(np.arange(0, 2 * max_tokens + 2), num_layers)
    assert np.all(np.diff(targets) <= 0)
    assert targets[0] == num_layers
    assert np.all((targets >= min(min_layer, num_layers)) & (targets <= num_layers))


def test_skipdecode_batch_uses_the_deepest_row_target():
    policy = SkipDecodeBatching(max_tokens=10, min_layer=2)
    positions = np.array([9, 2, 6])
    assert policy.target_layer(positions, 10) == policy.target_layer([2], 10) == 9


def test_skipdecode_exits_the_whole_batch_at_its_target():
    policy = SkipDecodeBatching(max_tokens=10, min_layer=2)
    positions = np.array([5, 7])  # target = 10 - floor(8 * 5 / 10) = 6
    before = _decide(policy, _b(1, 0), layer=5, num_layers=10, positions=positions)
    assert not before.take_token.any() and before.keep_running.all()
    at = _decide(policy, _b(0, 0), layer=6, num_layers=10, positions=positions)
    assert at.take_token.all() and not at.is_forced.any() and at.stop


def test_decide_rejects_the_final_layer_and_mismatched_rows():
    with pytest.raises(ValueError, match="layer"):
        _decide(ShrinkBatching(), _b(1), layer=8, num_layers=8)
    with pytest.raises(ValueError, match="1-D"):
        ShrinkBatching().decide(
            layer=1, num_layers=4, confident=_b(1, 0), has_token=_b(0), positions=np.zeros(2)
        )


def test_check_catches_a_broken_decision():
    none = _b(0, 0)
    broken = BatchDecision(
        take_token=_b(0, 0), is_forced=none, keep_running=_b(0, 1), park=none, stop=False
    )
    with pytest.raises(AssertionError, match="not parked"):
        broken.check(has_token=none)


# ---- random masks -------------------------------------------------------------------------------

POLICIES = st.one_of(
    st.builds(FullBatching),
    st.builds(ConsensusBatching),
    st.builds(QuorumBatching, fraction=st.floats(0.01, 1.0)),
    st.builds(ShrinkBatching),
    st.builds(RebatchBatching, park_below_fraction=st.floats(0.0, 1.0)),
    st.builds(SkipDecodeBatching, max_tokens=st.integers(1, 64), min_layer=st.integers(1, 12)),
)


@st.composite
def exit_points(draw):
    rows = draw(st.integers(0, 12))
    num_layers = draw(st.integers(2, 12))
    bools = st.lists(st.booleans(), min_size=rows, max_size=rows)
    return {
        "layer": draw(st.integers(1, num_layers - 1)),
        "num_layers": num_layers,
        "confident": np.array(draw(bools), dtype=bool),
        "has_token": np.array(draw(bools), dtype=bool),
        "positions": np.array(draw(st.lists(st.integers(0, 80), min_size=rows, max_size=rows))),
    }


@settings(max_examples=300, deadline=None)
@given(policy=POLICIES, step=exit_points())
def test_every_policy_keeps_the_decision_invariants(policy, step):
    decision = policy.decide(**step)
    decision.check(step["has_token"])
    has_token, confident = step["has_token"], step["confident"]
    without_token = ~has_token & ~decision.take_token
    # Nobody is dropped: every row without a token runs on or parks.
    assert np.all(~without_token | decision.keep_running | decision.park)
    assert decision.stop == (not decision.keep_running.any())
    # A forced row was not confident; a confident row never parks or is forced.
    assert not (decision.is_forced & confident).any()
    assert not (decision.park & confident).any()
    if policy.is_early_exit and policy.needs_signals:
        # Signal-driven policies fix the token of every newly confident row at once.
        assert np.all(decision.take_token[confident & ~has_token])


@settings(max_examples=200, deadline=None)
@given(step=exit_points())
def test_quorum_of_one_is_consensus(step):
    quorum = QuorumBatching(fraction=1.0).decide(**step)
    consensus = ConsensusBatching().decide(**step)
    for field in ("take_token", "is_forced", "keep_running", "park"):
        assert np.array_equal(getattr(quorum, field), getattr(consensus, field)), field
    assert quorum.stop == consensus.stop
