"""Exit rules, exit points, KV-fill policies and the import boundary of `policies`."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies import (
    ClassifierRule,
    CopyFill,
    ExitPoints,
    ExitSignals,
    FillDecision,
    HiddenCosineRule,
    LazyFill,
    PolicyConfigError,
    RecomputeFill,
    SkipFill,
    SoftmaxMarginRule,
)
from policies.kv_fill import Resolve

RULES = (SoftmaxMarginRule, HiddenCosineRule, ClassifierRule)


def _signals(values: list[float]) -> ExitSignals:
    array = np.array(values)
    return ExitSignals(softmax_margin=array, hidden_cosine=array, classifier_prob=array)


# ---- exit rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rule_cls", RULES)
def test_rule_is_confident_at_or_above_threshold(rule_cls):
    rule = rule_cls(threshold=0.5)
    confident = rule.confident(
        _signals([0.2, 0.5, 0.9, float("nan")]),
        positions=np.zeros(4, dtype=int),
        max_tokens=np.full(4, 10),
    )
    assert confident.tolist() == [False, True, True, False]


@pytest.mark.parametrize("rule_cls", RULES)
def test_rule_reads_only_its_own_signal(rule_cls):
    rule = rule_cls(threshold=0.5)
    values = {"softmax_margin": None, "hidden_cosine": None, "classifier_prob": None}
    values[rule.signal] = np.array([0.9])
    confident = rule.confident(ExitSignals(**values), positions=[0], max_tokens=[10])
    assert confident.tolist() == [True]


@pytest.mark.parametrize("rule_cls", RULES)
def test_rule_without_its_signal_is_a_config_error(rule_cls):
    rule = rule_cls(threshold=0.5)
    with pytest.raises(PolicyConfigError, match=rule.signal):
        rule.confident(ExitSignals(), positions=[0], max_tokens=[10])


@pytest.mark.parametrize(
    ("rule_cls", "bad", "shown_range"),
    [
        (SoftmaxMarginRule, -0.1, "[0, 1]"),
        (SoftmaxMarginRule, 1.5, "[0, 1]"),
        (ClassifierRule, -0.01, "[0, 1]"),
        (ClassifierRule, float("nan"), "[0, 1]"),
        (HiddenCosineRule, -1.5, "[-1, 1]"),
        (HiddenCosineRule, 1.01, "[-1, 1]"),
    ],
)
def test_threshold_out_of_range_names_rule_value_and_range(rule_cls, bad, shown_range):
    with pytest.raises(PolicyConfigError) as info:
        rule_cls(threshold=bad)
    message = str(info.value)
    assert rule_cls.name in message and str(bad) in message and shown_range in message


def test_hidden_accepts_negative_threshold():
    rule = HiddenCosineRule(threshold=-0.5)
    assert rule.confident(_signals([-0.6, -0.4]), positions=[0, 0], max_tokens=[5, 5]).tolist() == [
        False,
        True,
    ]


@pytest.mark.parametrize("tau", [-1.0, float("inf"), float("nan")])
def test_bad_decay_tau_is_rejected(tau):
    with pytest.raises(PolicyConfigError, match="decay_tau"):
        SoftmaxMarginRule(threshold=0.5, decay_tau=tau)


def test_constant_threshold_ignores_position():
    rule = ClassifierRule(threshold=0.7)
    assert rule.threshold_at(np.array([0, 5, 99]), np.array([10, 10, 100])).tolist() == [0.7] * 3


def test_calm_decay_at_start_and_end_of_output():
    rule = SoftmaxMarginRule(threshold=0.8, decay_tau=4.0)
    at_start, at_end = rule.threshold_at(np.array([0, 50]), np.array([50, 50]))
    # t = 0: 0.9·λ + 0.1·e^0; t = N: 0.9·λ + 0.1·e^(−τ).
    assert at_start == pytest.approx(0.9 * 0.8 + 0.1)
    assert at_end == pytest.approx(0.9 * 0.8 + 0.1 * np.exp(-4.0))


def test_calm_decay_uses_each_rows_own_max_tokens():
    rule = SoftmaxMarginRule(threshold=0.5, decay_tau=2.0)
    lam = rule.threshold_at(np.array([10, 10]), np.array([10, 40]))
    assert lam[0] == pytest.approx(0.45 + 0.1 * np.exp(-2.0))
    assert lam[1] == pytest.approx(0.45 + 0.1 * np.exp(-0.5))


def test_calm_decay_clips_to_range():
    assert SoftmaxMarginRule(threshold=1.0, decay_tau=0.0).threshold_at([0], [4]).tolist() == [1.0]


def test_calm_decay_changes_confidence_over_the_output():
    rule = SoftmaxMarginRule(threshold=0.8, decay_tau=4.0)
    # 0.75 is below λ(0) = 0.82 but above λ(N) ≈ 0.722.
    confident = rule.confident(_signals([0.75, 0.75]), positions=[0, 20], max_tokens=[20, 20])
    assert confident.tolist() == [False, True]


@given(
    threshold=st.floats(0, 1),
    tau=st.floats(0, 20),
    positions=st.lists(st.integers(0, 500), min_size=1, max_size=8),
)
def test_calm_threshold_stays_in_range_and_never_rises(threshold, tau, positions):
    rule = ClassifierRule(threshold=threshold, decay_tau=tau)
    ordered = np.sort(np.array(positions))
    lam = rule.threshold_at(ordered, np.full(len(ordered), 100))
    assert np.all((lam >= 0) & (lam <= 1))
    assert np.all(np.diff(lam) <= 1e-12)


# ---- exit points --------------------------------------------------------------------------------


def test_exit_points_default_every_layer_but_last():
    points = ExitPoints()
    assert points.layers(4) == (1, 2, 3)
    assert [points.is_exit_point(layer, 4) for layer in range(0, 6)] == [
        False,
        True,
        True,
        True,
        False,
        False,
    ]


def test_exit_points_with_min_and_stride():
    points = ExitPoints(min_exit_layer=3, stride=2)
    assert points.layers(10) == (3, 5, 7, 9)
    assert points.layers(9) == (3, 5, 7)
    assert points.layers(3) == ()


@given(min_exit=st.integers(1, 12), stride=st.integers(1, 6), num_layers=st.integers(1, 40))
def test_exit_point_predicate_matches_layer_list(min_exit, stride, num_layers):
    points = ExitPoints(min_exit_layer=min_exit, stride=stride)
    listed = tuple(
        layer for layer in range(0, num_layers + 2) if points.is_exit_point(layer, num_layers)
    )
    assert listed == points.layers(num_layers)


@pytest.mark.parametrize("kwargs", [{"min_exit_layer": 0}, {"stride": 0}, {"stride": -2}])
def test_bad_exit_points_are_rejected(kwargs):
    with pytest.raises(PolicyConfigError):
        ExitPoints(**kwargs)


# ---- KV fill ------------------------------------------------------------------------------------


def test_copy_fills_skipped_layers_now():
    decision = CopyFill().decide(executed_layers=np.array([2, 4, 1]), num_layers=4)
    assert decision.fill_now.tolist() == [
        [False, False, True, True],
        [False, False, False, False],
        [False, True, True, True],
    ]
    assert not decision.owe.any()


@pytest.mark.parametrize(
    ("policy", "resolve"), [(LazyFill(), Resolve.DEEP), (RecomputeFill(), Resolve.FROM_LAYER0)]
)
def test_lazy_and_recompute_owe_skipped_layers(policy, resolve):
    decision = policy.decide(executed_layers=np.array([3, 5]), num_layers=5)
    assert policy.resolve is resolve
    assert decision.owe.tolist() == [[False, False, False, True, True], [False] * 5]
    assert not decision.fill_now.any()


def test_skip_writes_and_owes_nothing():
    decision = SkipFill().decide(executed_layers=np.array([1, 2]), num_layers=6)
    assert SkipFill.resolve is Resolve.NEVER is CopyFill.resolve
    assert not decision.fill_now.any() and not decision.owe.any()
    assert decision.owe.shape == (2, 6)


@given(
    executed=st.lists(st.integers(0, 12), max_size=10),
    policy=st.sampled_from([CopyFill(), LazyFill(), RecomputeFill(), SkipFill()]),
)
def test_fill_masks_cover_exactly_the_skipped_layers(executed, policy):
    num_layers = 12
    decision: FillDecision = policy.decide(executed_layers=np.array(executed), num_layers=12)
    touched = decision.fill_now | decision.owe
    assert decision.fill_now.shape == decision.owe.shape == (len(executed), num_layers)
    assert not (decision.fill_now & decision.owe).any()
    for row, count in enumerate(executed):
        assert not touched[row, :count].any()  # computed layers already hold their K/V
        if policy.name != "skip":
            assert touched[row, count:].all()


def test_fill_rejects_impossible_layer_counts():
    with pytest.raises(ValueError, match="executed_layers"):
        CopyFill().decide(executed_layers=np.array([5]), num_layers=4)


# ---- import boundary ----------------------------------------------------------------------------


def test_policies_import_neither_torch_nor_testbed():
    code = (
        "import sys, policies; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'testbed')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
