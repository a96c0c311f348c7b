"""The replay runner's whole-step fast path, in plain Python.

Typical simulated steps hold 1-30 rows, where numpy's per-call overhead dwarfs the arithmetic and
the general path (replay.py: one batching decision per exit point, counted layer by layer) spends
most of its time in it. Here a step is settled at once: each decode row's first confident exit
layer was computed at admission (replay_state.py), `BatchingPolicy.step_exits` turns those into every
row's executed layers and token layer, and the per-layer counts follow from difference arrays.

It covers every step under the built-in policies (rebatch's resume rows through
`BatchingPolicy.step_exits_from`); `FastReplay.execute` returns None for any other step and the
caller runs the general path, before either touches the runner's state. steady_stretch.py
replays steady decode steps (Scheduler.steady_step) without plans on the same policy calls.
tests/test_sim_fastpath.py checks the paths agree.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC
from itertools import accumulate
from typing import NamedTuple

from policies.fast_path import StepExits
from policies.kv_fill import FillKind, Resolve
from testbed.core.policy_set import PolicySet
from testbed.core.step import RowResult, StepPlan, StepResult
from testbed.sim.replay_state import Deferred, SeqReplay
from testbed.sim.step_work import StepWork


class _Read(NamedTuple):
    """Per-row lists a step reads (decode, confident and positions: its decode rows only)."""

    replays: list[SeqReplay]
    out_pos: list[int]
    decode: list[int]
    confident: list[int]
    positions: list[int]
    restarted: list[int]  # sequences re-prefilled from position 0
    starts: list[int]  # per decode row, its first layer (a resume row's parked layer)


class FastReplay:
    """The fast path for one run's policies; build it only when `fill_kind` gave a FillKind."""

    def __init__(self, policies: PolicySet, fill: FillKind, num_layers: int) -> None:
        self.batching, self.fill, self.num_layers = policies.batching, fill, num_layers
        self.exit_layers = policies.exit_points.layers(num_layers)
        self.is_from_layer0 = policies.kv_fill.resolve is Resolve.FROM_LAYER0

    def execute(
        self,
        plan: StepPlan,
        seqs: dict[int, SeqReplay],
        deferred: dict[int, list[Deferred]],
        duration_s: float,
    ) -> StepWork | None:
        """Execute ``plan`` like the general path; None, state untouched, when it can't."""
        L, rows = self.num_layers, plan.rows
        read = self._read(plan, seqs)
        if read is None:
            return None
        executed = [L] * len(rows)
        token_layer: list[int | None] = [L if row.is_sampling else None for row in rows]
        forced = [False] * len(rows)
        parked_layer: list[int | None] = [None] * len(rows)
        num_points = num_evals = 0
        if read.decode:
            exits = self.exits(read.confident, read.positions, read.starts)
            if exits is None:
                return None
            for i, r in enumerate(read.decode):
                executed[r], token_layer[r] = exits.executed[i], exits.token_layer[i]
                forced[r] = exits.is_forced[i]
                if exits.parked_layer is not None and exits.parked_layer[i] is not None:
                    parked_layer[r] = exits.parked_layer[i]
            num_points, num_evals = exits.num_exit_points, exits.num_rule_evals
        for seq_id in read.restarted:  # a prefill from position 0: a re-prefill after preemption
            deferred.pop(seq_id, None)
        layer_tokens, layer_ctx = _layer_counts(plan, executed, deferred, L)
        # a parked row owes no K/V fill: its deep layers run when it resumes
        fill_rows = [r for r in read.decode if parked_layer[r] is None]
        kv_only = self._settle(plan, executed, read.decode, fill_rows, deferred)
        row_results = tuple(
            RowResult(
                seq_id=row.seq_id,
                token_id=None
                if token_layer[r] is None
                else read.replays[r].token_at(read.out_pos[r]),
                exit_layer=token_layer[r],
                is_forced=forced[r],
                is_parked=parked_layer[r] is not None,
                parked_layer=parked_layer[r],
            )  # fmt: skip
            for r, row in enumerate(rows)
        )
        result = StepResult(
            step_id=plan.step_id, rows=row_results, num_row_layers_executed=sum(layer_tokens),
            num_kv_only_row_layers=sum(kv_only), num_rule_evals=num_evals,
            num_forced_exits=sum(forced), num_exit_points=num_points,
            num_attention_pairs=sum(layer_ctx), duration_s=duration_s,
        )  # fmt: skip
        return StepWork(result, layer_tokens, layer_ctx, kv_only, tuple(executed))

    def _read(self, plan: StepPlan, seqs: dict[int, SeqReplay]) -> _Read | None:
        """One pass over the rows: what the step reads."""
        L, reads_signals = self.num_layers, self.batching.needs_signals
        read = _Read([], [], [], [], [], [], [])
        for r, row in enumerate(plan.rows):
            seq = seqs[row.seq_id]
            pos = row.start_position + len(row.token_ids) - seq.num_prompt_tokens
            read.replays.append(seq)
            read.out_pos.append(pos)
            if row.is_prefill:
                if row.start_position == 0:
                    read.restarted.append(row.seq_id)
                continue
            read.decode.append(r)
            read.positions.append(pos)
            read.starts.append(row.start_layer)  # > 0: a rebatch row resuming its deep layers
            if reads_signals:  # clamped to its last entry, like SeqReplay.token_at
                read.confident.append(seq.confident[min(pos, len(seq.confident) - 1)])
            else:
                read.confident.append(L)
        return read

    def exits(
        self, confident: SequenceABC[int], positions: SequenceABC[int],
        starts: SequenceABC[int] | None,
    ) -> StepExits | None:  # fmt: skip
        """The policy's outcome for decode rows that start at ``starts`` (a resume row at its
        parked layer; None: all at layer 0); None: the general path's business."""
        L = self.num_layers
        if starts is None or not any(starts):
            return self.batching.step_exits(confident, positions, self.exit_layers, L)
        # a resume row parked where it was not yet confident, so its first confident layer lies
        # above its start; a row that breaks this is the general path's
        if any(s and c <= s for s, c in zip(starts, confident, strict=True)):
            return None
        return self.batching.step_exits_from(confident, positions, starts, self.exit_layers, L)

    def _settle(
        self,
        plan: StepPlan,
        executed: list[int],
        decode: list[int],
        fill_rows: list[int],
        deferred: dict[int, list[Deferred]],
    ) -> tuple[int, ...]:
        """Deferred positions advance as far as their row ran; then the KV fill of exited rows.
        Returns the K/V-only tokens per layer."""
        L = self.num_layers
        if deferred:
            for r in decode:
                seq_id, reached = plan.rows[r].seq_id, executed[r]
                if seq_id in deferred:
                    deferred[seq_id] = [
                        Deferred(d.position, max(d.layer, reached))
                        for d in deferred[seq_id] if max(d.layer, reached) < L
                    ]  # fmt: skip
        kv_only = [0] * (L + 1)  # difference array
        for r in fill_rows:
            if executed[r] >= L:
                continue
            if self.fill.is_filled_now:
                kv_only[executed[r]] += 1
                kv_only[L] -= 1
            if self.fill.is_owed:
                layer = 0 if self.is_from_layer0 else executed[r]
                deferred.setdefault(plan.rows[r].seq_id, []).append(
                    Deferred(plan.rows[r].start_position, layer)
                )
        return tuple(accumulate(kv_only[:L]))


def _layer_counts(
    plan: StepPlan, executed: list[int], deferred: dict[int, list[Deferred]], L: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per layer: tokens that ran it and the sum of their context lengths. Every row runs layers
    [start_layer, executed); a deferred position rides along with its row from its first owed layer."""
    tokens, ctx = [0] * (L + 1), [0] * (L + 1)  # difference arrays
    for row, stop in zip(plan.rows, executed, strict=True):
        n, first, start = len(row.token_ids), row.start_position, row.start_layer
        tokens[start] += n
        tokens[stop] -= n
        span_ctx = n * first + n * (n + 1) // 2  # sum of (position + 1) over the fed tokens
        ctx[start] += span_ctx
        ctx[stop] -= span_ctx
        if row.is_prefill or not deferred:
            continue
        for d in deferred.get(row.seq_id, ()):
            if d.layer < stop:
                tokens[d.layer] += 1
                tokens[stop] -= 1
                ctx[d.layer] += d.position + 1
                ctx[stop] -= d.position + 1
    return tuple(accumulate(tokens[:L])), tuple(accumulate(ctx[:L]))
