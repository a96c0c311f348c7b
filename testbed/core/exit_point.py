"""One exit point, for every runner: gather the candidate rows, evaluate the exit rule on those
that hold no token yet, ask the batching policy, apply its decision (DESIGN §4).

The native runner, the simulator's replay runner and the vLLM model all run this code; each
supplies only what differs, the signal (`SignalSource`: from hidden states, or read off a trace)
and the tokens of the rows that take one here (`RowExits.take`). numpy only, like the rest of
core.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from policies.exit_rules import ExitSignals
from testbed.core.policy_set import PolicySet
from testbed.core.step import RowResult, StepResult


@dataclass
class StepCounters:
    """The work of one step, as StepResult reports it."""

    row_layers: int = 0  # (row, layer) pairs that ran the full layer
    kv_only: int = 0  # (row, layer) pairs that only computed K/V
    rule_evals: int = 0  # (row, exit point) pairs where the rule was evaluated
    forced: int = 0  # rows the batching policy forced out before they were confident
    exit_points: int = 0  # exit points where the batching policy was asked
    attention_pairs: int = 0  # (query, key) pairs attention scored

    def result(self, step_id: int, rows: tuple[RowResult, ...], duration_s: float) -> StepResult:
        return StepResult(
            step_id=step_id, rows=rows, num_row_layers_executed=self.row_layers,
            num_kv_only_row_layers=self.kv_only, num_rule_evals=self.rule_evals,
            num_forced_exits=self.forced, num_exit_points=self.exit_points,
            num_attention_pairs=self.attention_pairs, duration_s=duration_s,
        )  # fmt: skip


@dataclass
class RowExits:
    """Per row of a step ([rows]): what the exit points have decided so far."""

    is_running: np.ndarray  # bool: still computing layers
    token: list[int | None]  # the row's token, once taken
    token_layer: list[int | None]  # the layer whose head gave it (num_layers: the final one)
    is_forced: np.ndarray  # bool: the policy forced the row out before it was confident
    parked_layer: list[int | None]  # rebatch: the exit point the row was parked at
    executed: np.ndarray  # int: layers computed for the row's newest position

    @classmethod
    def start(cls, num_rows: int, num_layers: int) -> RowExits:
        return cls(
            is_running=np.ones(num_rows, dtype=bool), token=[None] * num_rows,
            token_layer=[None] * num_rows, is_forced=np.zeros(num_rows, dtype=bool),
            parked_layer=[None] * num_rows, executed=np.full(num_rows, num_layers),
        )  # fmt: skip

    def take(self, rows: Sequence[int], layer: int, tokens: Sequence[int] | None) -> None:
        """These rows take their tokens at ``layer`` (None: a sampler outside the runner picks
        them later from the exit state, as vLLM's does)."""
        for i, r in enumerate(rows):
            self.token_layer[r] = layer
            self.token[r] = None if tokens is None else int(tokens[i])

    def has_token(self, rows: np.ndarray) -> np.ndarray:
        return np.array([self.token_layer[r] is not None for r in rows.tolist()], dtype=bool)

    def untaken(self, is_sampling: Sequence[bool]) -> np.ndarray:
        """Rows that reached the last layer owing a token: they take the final head's."""
        rows = [r for r, s in enumerate(is_sampling)
                if s and self.token_layer[r] is None and self.parked_layer[r] is None]  # fmt: skip
        return np.array(rows, dtype=np.int64)

    def result(self, r: int, seq_id: int) -> RowResult:
        parked = self.parked_layer[r]
        token = None if parked is not None else self.token[r]
        return RowResult(
            seq_id=seq_id, token_id=token,
            exit_layer=self.token_layer[r] if token is not None else None,
            is_forced=bool(self.is_forced[r]), is_parked=parked is not None, parked_layer=parked,
        )  # fmt: skip


class SignalSource(Protocol):
    def signal(self, layer: int, rows: np.ndarray, name: str) -> np.ndarray:
        """float [len(rows)]: signal ``name`` at exit point ``layer`` for these rows (rows that
        hold no token yet)."""


@dataclass(frozen=True)
class ExitOutcome:
    takers: np.ndarray  # rows whose token comes from this exit point's head
    stopping: np.ndarray  # rows that computed their last layer here (takers, forced, parked)


def is_exit_layer(policies: PolicySet, layer: int, num_layers: int) -> bool:
    """Whether runners must stop at ``layer`` (1-based) and call `exit_point`."""
    return (policies.batching.is_early_exit and layer < num_layers
            and policies.exit_points.is_exit_point(layer, num_layers))  # fmt: skip


def exit_point(
    policies: PolicySet, layer: int, num_layers: int, rows: RowExits, *,
    eligible: np.ndarray, positions: np.ndarray, max_tokens: np.ndarray,
    counters: StepCounters, source: SignalSource,
) -> ExitOutcome | None:  # fmt: skip
    """Decide exit point ``layer`` for the running rows among ``eligible`` (bool [rows]: decode
    rows that ran this layer); positions and max_tokens ([rows]) feed λ(t) and the policy. None
    when it is no exit point or no row is a candidate. The caller then gives the takers their
    tokens (`RowExits.take`) and keeps what its stopping rows need."""
    if not is_exit_layer(policies, layer, num_layers):
        return None
    cand = np.flatnonzero(rows.is_running & eligible)
    if len(cand) == 0:
        return None
    has_token = rows.has_token(cand)
    confident = np.zeros(len(cand), dtype=bool)
    need = cand[~has_token]
    rule = policies.exit_rule
    if policies.batching.needs_signals and len(need):
        values = source.signal(layer, need, rule.signal)
        counters.rule_evals += len(need)
        confident[~has_token] = rule.confident(
            ExitSignals(**{rule.signal: values}), positions=positions[need],
            max_tokens=max_tokens[need],
        )  # fmt: skip
    counters.exit_points += 1
    d = policies.batching.decide(layer=layer, num_layers=num_layers, confident=confident,
                                 has_token=has_token, positions=positions[cand])  # fmt: skip
    rows.is_forced[cand[d.is_forced]] = True
    counters.forced += int(d.is_forced.sum())
    stopping = cand[~d.keep_running]
    rows.is_running[stopping] = False
    rows.executed[stopping] = layer
    for r in cand[d.park].tolist():
        rows.parked_layer[r] = layer
    return ExitOutcome(takers=cand[d.take_token], stopping=stopping)
