"""Whole-step fast paths of the built-in policies, for the simulator's replay runner.

The general path asks the batching policy at every exit point in turn (`BatchingPolicy.decide`).
For the built-in policies the outcome of a whole step follows from one number per row: the first
exit point at which the row is confident (`confident` is masked once a row holds a token, so later
points never matter). A replay knows that number for every token in advance, because oracle
signals are fixed per token; these functions turn it into the step's outcome in plain Python,
which is far faster than numpy on the 1-30 rows of a typical step.

Only exact built-in types take a fast path (a subclass may override `_decide`); anything else
gets None and runs the general path. tests/test_sim_fastpath.py checks, on random inputs, that
every fast path equals the general one (DESIGN §4).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from policies.batching import (
    BatchingPolicy,
    ConsensusBatching,
    FullBatching,
    QuorumBatching,
    ShrinkBatching,
    SkipDecodeBatching,
)
from policies.exit_rules import ThresholdRule
from policies.kv_fill import CopyFill, KvFillPolicy, LazyFill, RecomputeFill, SkipFill


def has_confident_layers(rule: ThresholdRule) -> bool:
    """Whether `confident_layers` reproduces ``rule``: it does unless a subclass (a third-party
    rule) overrides `confident` itself; overriding `threshold_at` is fine."""
    return type(rule).confident is ThresholdRule.confident


def confident_layers(
    rule: ThresholdRule,
    values: np.ndarray,
    *,
    exit_layers: Sequence[int],
    num_layers: int,
    positions: np.ndarray,
    max_tokens: int,
) -> list[int]:
    """Per token, the first exit layer where ``rule`` is confident; num_layers where it never is.

    values: float [tokens, num_layers], the rule's signal per token and layer (NaN: never
    confident); positions: int [tokens], their 0-based output indices (for λ(t)). The same
    comparison as `ThresholdRule.confident`, vectorised over a whole sequence.
    """
    first = np.full(len(values), num_layers, dtype=np.int64)
    if not exit_layers or not len(values):
        return first.tolist()
    thresholds = rule.threshold_at(positions, np.full(len(values), max_tokens))  # [tokens]
    at_points = np.asarray(values, dtype=np.float64)[:, np.asarray(exit_layers) - 1]
    is_confident = at_points >= thresholds[:, None]  # [tokens, exit points]
    has_any = is_confident.any(axis=1)
    first[has_any] = np.asarray(exit_layers)[is_confident.argmax(axis=1)[has_any]]
    return first.tolist()


class StepExits(NamedTuple):
    """A step's decode rows after every exit point; lists are per row, in the given order.
    A NamedTuple rather than a frozen dataclass: it is built once per simulated step."""

    executed: list[int]  # layers each row computed
    token_layer: list[int]  # layer whose head gives the row's token (num_layers: the final one)
    is_forced: list[bool]  # the policy forced the row out before it was confident
    num_exit_points: int  # exit points at which the policy was asked
    num_rule_evals: int  # (row, exit point) pairs where the rule was evaluated


def has_step_exits(policy: BatchingPolicy) -> bool:
    """Whether `step_exits` covers ``policy`` (rebatch parks rows and has no fast path)."""
    return type(policy) in _STEP_EXITS  # the exact type: a subclass may override `_decide`


def step_exits(
    policy: BatchingPolicy,
    *,
    confident: Sequence[int],
    positions: Sequence[int],
    exit_layers: Sequence[int],
    num_layers: int,
) -> StepExits | None:
    """The outcome of one step's decode rows, all starting at layer 0; None: no fast path.

    confident: per row, the first exit layer where the rule is confident (num_layers: never);
    positions: per row, the output index of the token it produces; exit_layers: the exit points,
    ascending, all below num_layers.
    """
    fast = _STEP_EXITS.get(type(policy))
    return None if fast is None else fast(policy, confident, positions, exit_layers, num_layers)


def _full(policy, confident, positions, exit_layers, num_layers: int) -> StepExits:
    rows = len(confident)
    return StepExits([num_layers] * rows, [num_layers] * rows, [False] * rows, 0, 0)


def _skipdecode(policy, confident, positions, exit_layers, num_layers: int) -> StepExits:
    # the schedule, not confidence, ends the step: no rule evaluations, no forced exits
    rows = len(confident)
    target = policy.target_layer(np.asarray(positions, dtype=np.int64), num_layers)
    stop = next((e for e in exit_layers if e >= target), num_layers)
    num_points = bisect_right(exit_layers, stop)
    return StepExits([stop] * rows, [stop] * rows, [False] * rows, num_points, 0)


def _shrink(policy, confident, positions, exit_layers, num_layers: int) -> StepExits:
    # every row leaves at its own first confident exit point
    num_evals = sum([bisect_right(exit_layers, c) for c in confident])
    return StepExits(list(confident), list(confident), [False] * len(confident),
                     bisect_right(exit_layers, max(confident)), num_evals)  # fmt: skip


def _consensus(policy, confident, positions, exit_layers, num_layers: int) -> StepExits:
    # the batch runs until its last row is confident; each row keeps its first confident token
    stop = max(confident)
    num_evals = sum([bisect_right(exit_layers, c) for c in confident])
    return StepExits([stop] * len(confident), list(confident), [False] * len(confident),
                     bisect_right(exit_layers, stop), num_evals)  # fmt: skip


def _quorum(policy, confident, positions, exit_layers, num_layers: int) -> StepExits:
    # the batch runs together to `stop`; rows not yet confident there are forced out
    stop = _quorum_stop(policy.fraction, confident, exit_layers, num_layers)
    num_evals = sum([bisect_right(exit_layers, min(c, stop)) for c in confident])
    return StepExits([stop] * len(confident), [min(c, stop) for c in confident],
                     [c > stop for c in confident], bisect_right(exit_layers, stop),
                     num_evals)  # fmt: skip


_STEP_EXITS = {
    FullBatching: _full,
    ConsensusBatching: _consensus,
    QuorumBatching: _quorum,
    ShrinkBatching: _shrink,
    SkipDecodeBatching: _skipdecode,
}


def _quorum_stop(
    fraction: float, confident: Sequence[int], exit_layers: Sequence[int], num_layers: int
) -> int:
    """The first exit layer where the share of rows holding a token reaches ``fraction``."""
    ordered = sorted(confident)
    for layer in exit_layers:
        num_done = bisect_right(ordered, layer)
        if num_done / len(ordered) >= fraction:  # the ratio, exactly as QuorumBatching computes it
            return layer
    return num_layers


@dataclass(frozen=True)
class FillKind:
    """A built-in KV-fill policy reduced to what it does with a row's skipped layers."""

    is_filled_now: bool  # every skipped layer computes its K/V before the step ends
    is_owed: bool  # every skipped layer is owed, resolved later as the policy's `resolve`


_FILL_KINDS: dict[type[KvFillPolicy], FillKind] = {
    CopyFill: FillKind(is_filled_now=True, is_owed=False),
    LazyFill: FillKind(is_filled_now=False, is_owed=True),
    RecomputeFill: FillKind(is_filled_now=False, is_owed=True),
    SkipFill: FillKind(is_filled_now=False, is_owed=False),
}


def fill_kind(policy: KvFillPolicy) -> FillKind | None:
    """The fast path of a built-in KV-fill policy; None for any other (it runs `decide`)."""
    return _FILL_KINDS.get(type(policy))
