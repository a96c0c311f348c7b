"""The exit rule's fast path, for the simulator's replay runner, and the record of the batching
policies' own (their methods: `BatchingPolicy.step_exits`; the KV fill's: `KvFillPolicy.fill_kind`).

For a whole step the outcome follows from one number per row: the first exit point at which
the row is confident (`confident` is masked once a row holds a token, so later points never
matter). A replay knows that number for every token in advance, because oracle signals are fixed
per token; `confident_layers` computes it for a whole sequence at once. Only a rule that keeps
`ThresholdRule.confident` takes it; tests/test_sim_fastpath.py checks it against the general path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from policies.exit_rules import ThresholdRule


class StepExits(NamedTuple):
    """A whole step's decode rows after every exit point, from each row's first confident exit
    layer (`BatchingPolicy.step_exits`); lists are per row, in the given order. A NamedTuple
    rather than a frozen dataclass: the simulator builds one per step."""

    executed: list[int]  # layers each row computed
    token_layer: list[int | None]  # layer whose head gives its token (None: parked, no token)
    is_forced: list[bool]  # the policy forced the row out before it was confident
    num_exit_points: int  # exit points at which the policy was asked
    num_rule_evals: int  # (row, exit point) pairs where the rule was evaluated
    parked_layer: list[int | None] | None = None  # rebatch: where a row was parked; None: none


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
