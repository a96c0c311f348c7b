"""The replay runner: stands in for the engine's ModelRunner inside the simulator.

It executes a StepPlan without a model: at each exit point the exit rule reads the trace's
recorded signals for the token being produced, then the *same* batching and KV-fill policy
objects decide, in the same order as testbed/engine/runner.py. Instead of tensors it counts
the work per layer, which a cost model turns into time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policies.fast_path import has_confident_layers
from policies.kv_fill import Resolve
from testbed.core.exit_point import RowExits, StepCounters, exit_point
from testbed.core.policy_set import PolicySet
from testbed.core.sequence import Sequence
from testbed.core.step import StepPlan
from testbed.sim.replay_fast import FastReplay
from testbed.sim.replay_state import Deferred, SeqReplay, SeqReplayFactory
from testbed.sim.steady_stretch import SteadyStretch
from testbed.sim.step_work import StepWork
from testbed.sim.token_source import TokenStream

__all__ = ["ReplayRunner", "StepWork"]


@dataclass(frozen=True)
class _Units:
    """Per-step arrays of the tokens each row feeds and the deferred positions riding along."""

    num_tokens: np.ndarray  # [rows] tokens fed
    ctx_sum: np.ndarray  # [rows] sum over fed tokens of their context length (position + 1)
    def_row: np.ndarray  # [deferred] owning row
    def_layer: np.ndarray  # [deferred] first layer it still owes
    def_ctx: np.ndarray  # [deferred] its context length
    boundaries: frozenset[int]  # layers where some row or deferred position starts running

    @classmethod
    def build(cls, plan: StepPlan, deferred: dict[int, list[Deferred]]) -> _Units:
        n = np.array([r.num_tokens for r in plan.rows], dtype=np.int64)
        first = np.array([r.start_position for r in plan.rows], dtype=np.int64)
        rows, layers, ctx = [], [], []
        for r, row in enumerate(plan.rows):
            for d in () if row.is_prefill else deferred.get(row.seq_id, ()):
                rows.append(r)
                layers.append(d.layer)
                ctx.append(d.position + 1)
        as_int = lambda v: np.array(v, dtype=np.int64)  # noqa: E731
        starts = frozenset(r.start_layer for r in plan.rows) | frozenset(layers)
        return cls(
            n, n * first + n * (n + 1) // 2, as_int(rows), as_int(layers), as_int(ctx), starts
        )


@dataclass
class _Step:
    exits: RowExits
    layer_tokens: np.ndarray
    layer_ctx: np.ndarray
    units: _Units
    out_pos: np.ndarray  # [rows] output index of the token each row produces
    max_tokens: np.ndarray  # [rows] the requests' output limits
    counters: StepCounters
    last_work: tuple[int, int] | None = None  # (tokens, context) of the last counted layer
    is_changed: bool = False  # a row stopped since last_work was counted


@dataclass(frozen=True)
class _TraceSignals:
    """The exit rule's signal read off the trace (a core.exit_point.SignalSource)."""

    runner: ReplayRunner
    plan: StepPlan

    def signal(self, layer: int, rows: np.ndarray, name: str) -> np.ndarray:
        at = self.runner._signal_at
        return np.array([at(self.plan.rows[r], name, layer) for r in rows.tolist()])


class ReplayRunner:
    """Executes plans against trace streams. Steps the fast path covers (replay_fast.py) take it
    unless ``use_fast_path`` is False; the rest run the general path below, which asks the
    policies at every exit point exactly as the engine's runner does."""

    def __init__(self, policies: PolicySet, num_layers: int, *, use_fast_path: bool = True) -> None:
        self.policies, self.num_layers = policies, num_layers
        self.seqs: dict[int, SeqReplay] = {}
        self.deferred: dict[int, list[Deferred]] = {}
        fill = policies.kv_fill.fill_kind
        is_fast = (
            use_fast_path
            and fill is not None
            and policies.batching.has_step_exits
            and has_confident_layers(policies.exit_rule)
        )
        self._fast = FastReplay(policies, fill, num_layers) if is_fast else None
        self._factory = SeqReplayFactory(policies, num_layers, with_confident=is_fast)

    def add_sequence(
        self, seq_id: int, stream: TokenStream, num_prompt_tokens: int, max_tokens: int
    ) -> None:
        self.seqs[seq_id] = self._factory.build(stream, num_prompt_tokens, max_tokens)

    def release(self, seq_id: int) -> None:
        self.seqs.pop(seq_id, None)
        self.deferred.pop(seq_id, None)

    @property
    def has_steady(self) -> bool:
        """Whether `stretch` can replay steady steps: the fast path is on and the KV fill owes
        nothing (a lazy or recompute fill defers positions, which only plans carry)."""
        return self._fast is not None and not self._fast.fill.is_owed

    def stretch(self, seqs: tuple[Sequence, ...], num_steps: int, rule: str) -> SteadyStretch:
        """The next steady steps of Scheduler.steady_step's ``seqs``, at most num_steps of
        them (Scheduler.steady_horizon), without their plans."""
        assert self._fast is not None, "steady steps need has_steady"
        return SteadyStretch(self._fast, seqs, self.seqs, num_steps, rule)

    def execute(self, plan: StepPlan, duration_s: float = 0.0) -> StepWork:
        if self._fast is not None:
            work = self._fast.execute(plan, self.seqs, self.deferred, duration_s)
            if work is not None:
                return work
        return self._execute_general(plan, duration_s)

    def _execute_general(self, plan: StepPlan, duration_s: float) -> StepWork:
        L, rows = self.num_layers, plan.rows
        for row in rows:
            if row.is_prefill and row.start_position == 0:  # re-prefill after a preemption
                self.deferred.pop(row.seq_id, None)
        st = _Step(
            exits=RowExits.start(len(rows), L),
            layer_tokens=np.zeros(L, dtype=np.int64), layer_ctx=np.zeros(L, dtype=np.int64),
            units=_Units.build(plan, self.deferred),
            out_pos=np.array([self._out_pos(r) for r in rows], dtype=np.int64),
            max_tokens=np.array([self.seqs[r.seq_id].max_tokens for r in rows], dtype=np.int64),
            counters=StepCounters(),
        )  # fmt: skip
        start = np.array([r.start_layer for r in rows])
        is_decode = np.array([not r.is_prefill for r in rows], dtype=bool)
        for i in range(L):
            if not self._layer(plan, st, i, start, is_decode):
                break
        last = st.exits.untaken([row.is_sampling for row in rows])  # they take the last layer's
        st.exits.take(last.tolist(), L, [self._token(rows[r]) for r in last.tolist()])
        kv_only = self._settle(plan, st, is_decode)
        st.counters.kv_only = int(kv_only.sum())
        st.counters.attention_pairs = int(st.layer_ctx.sum())
        results = tuple(st.exits.result(r, row.seq_id) for r, row in enumerate(rows))
        result = st.counters.result(plan.step_id, results, duration_s)
        return StepWork(result, tuple(st.layer_tokens.tolist()), tuple(st.layer_ctx.tolist()),
                        tuple(kv_only.tolist()), tuple(st.exits.executed.tolist()))  # fmt: skip

    def _layer(
        self, plan: StepPlan, st: _Step, i: int, start: np.ndarray, is_decode: np.ndarray
    ) -> bool:
        """Count layer i's work (vectorised over rows); False when nothing is left to run."""
        u = st.units
        # the active set changes only where a row stops or a row/deferred start layer is crossed
        if st.last_work is None or st.is_changed or i in u.boundaries:
            running = st.exits.is_running
            main = running & (start <= i)  # rows whose fed tokens run this layer
            deferred = running[u.def_row] & (u.def_layer <= i)  # riding-along positions
            num = int(u.num_tokens[main].sum()) + int(deferred.sum())
            ctx = int(u.ctx_sum[main].sum()) + int(u.def_ctx[deferred].sum())
            st.last_work, st.is_changed = (num, ctx), False
        num, ctx = st.last_work
        if num == 0:
            return bool(st.exits.is_running.any())
        st.layer_tokens[i] += num
        st.layer_ctx[i] += ctx
        st.counters.row_layers += num
        outcome = exit_point(
            self.policies, i + 1, self.num_layers, st.exits, eligible=is_decode & (start <= i),
            positions=st.out_pos, max_tokens=st.max_tokens, counters=st.counters,
            source=_TraceSignals(self, plan),
        )  # fmt: skip
        if outcome is not None:
            takers = outcome.takers.tolist()
            st.exits.take(takers, i + 1, [self._token(plan.rows[r]) for r in takers])
            st.is_changed |= len(outcome.stopping) > 0
        return True

    def _out_pos(self, row) -> int:
        return row.end_position - self.seqs[row.seq_id].num_prompt_tokens

    def _token(self, row) -> int:
        return self.seqs[row.seq_id].token_at(self._out_pos(row))

    def _signal_at(self, row, signal: str, layer: int) -> float:
        stream = self.seqs[row.seq_id].stream
        return float(stream.signals[signal][min(self._out_pos(row), len(stream) - 1), layer - 1])

    def _settle(self, plan: StepPlan, st: _Step, is_decode: np.ndarray) -> np.ndarray:
        """Deferred positions advance as far as their row ran; then the KV-fill policy."""
        L = self.num_layers
        kv_only = np.zeros(L, dtype=np.int64)
        for r, row in enumerate(plan.rows):
            if is_decode[r] and row.seq_id in self.deferred:
                reached = int(st.exits.executed[r])
                self.deferred[row.seq_id] = [
                    Deferred(d.position, max(d.layer, reached))
                    for d in self.deferred[row.seq_id] if max(d.layer, reached) < L
                ]  # fmt: skip
        fill_rows = [r for r in range(len(plan.rows))
                     if is_decode[r] and st.exits.parked_layer[r] is None and st.exits.executed[r] < L]  # fmt: skip
        if not fill_rows:
            return kv_only
        decision = self.policies.kv_fill.decide(
            executed_layers=st.exits.executed[fill_rows], num_layers=L
        )
        kv_only += decision.fill_now.sum(axis=0)
        from_layer0 = self.policies.kv_fill.resolve is Resolve.FROM_LAYER0
        for i, r in enumerate(fill_rows):
            if decision.owe[i].any():
                layer = 0 if from_layer0 else int(st.exits.executed[r])
                self.deferred.setdefault(plan.rows[r].seq_id, []).append(
                    Deferred(plan.rows[r].start_position, layer)
                )
        return kv_only
