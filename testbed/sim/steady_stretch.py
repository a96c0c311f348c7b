"""A steady stretch: the run of steady decode steps (Scheduler.steady_step) of one set of rows
that a simulation replays between two changes of its batch, without plans.

In a long simulation most steps are steady, and a step's own work is tiny (1-30 rows), so what
a step costs is its per-row bookkeeping. A stretch reads its rows' replay lists once and
transposes them, so a step takes its rows' positions and signals as one tuple each; the
scheduler then applies the whole stretch at once (Scheduler.apply_steady_steps). Like
`FastReplay.execute` on each step's plan, for a run whose fill owes nothing (no deferred
positions); tests/test_sim_fastpath.py checks whole simulations agree to the bit.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC

from testbed.core.sequence import Sequence
from testbed.sim.cost_base import StepFeatures
from testbed.sim.replay_fast import FastReplay, decode_layer_counts, uniform_layer_counts
from testbed.sim.replay_state import SeqReplay
from testbed.sim.step_work import SteadyWork


class SteadyStretch:
    """Up to ``num_steps`` steady steps of ``seqs`` (at most Scheduler.steady_horizon), cut
    to end with the first step that emits a row's EOS. Step ``ahead`` is the one ``ahead``
    steps after the next; the stretch changes neither the rows nor the scheduler."""

    def __init__(
        self, fast: FastReplay, seqs: SequenceABC[Sequence], replays: dict[int, SeqReplay],
        num_steps: int, rule: str,
    ) -> None:  # fmt: skip
        self._fast, self._rule = fast, rule
        self._rows = rows = [replays[seq.seq_id] for seq in seqs]
        self._starts = starts = [len(seq.output_token_ids) for seq in seqs]
        self.num_steps = n = _until_eos(seqs, rows, starts, num_steps)
        # [step][row]: the output index of the token each row produces (< max_tokens, which
        # the replay lists hold: see SeqReplay), and its first confident exit layer
        self._positions = list(zip(*[range(p, p + n) for p in starts], strict=True))
        self._confident = None
        if fast.batching.needs_signals:
            columns = [r.confident[p : p + n] for r, p in zip(rows, starts, strict=True)]
            self._confident = list(zip(*columns, strict=True))
        self._prompts = [r.num_prompt_tokens for r in rows]
        # each row feeds position context - 1; all grow by one a step
        self._num_context = sum(self._prompts) + sum(starts)

    def step(self, ahead: int) -> SteadyWork | None:
        """Step ``ahead`` of the stretch; None when the policy has no fast path."""
        fast, L = self._fast, self._fast.num_layers
        positions, num_rows = self._positions[ahead], len(self._rows)
        confident = [L] * num_rows if self._confident is None else self._confident[ahead]
        exits = fast.batching.step_exits(confident, positions, fast.exit_layers, L)
        if exits is None:
            return None
        parked = exits.parked_layer
        if parked is not None and not any(parked):  # parked layers are exit points, never 0
            parked = None
        executed, num_context = exits.executed, self._num_context + num_rows * ahead
        if parked is None and executed.count(executed[0]) == num_rows:  # consensus, full
            counts = uniform_layer_counts(num_rows, executed[0], num_context, L, fast.fill)
        else:
            contexts = [n + p for n, p in zip(self._prompts, positions, strict=True)]
            counts = decode_layer_counts(executed, contexts, num_context, L, parked, fast.fill)
        layer_tokens, layer_ctx, layer_kv = counts
        features = StepFeatures(
            num_rows=num_rows, num_prefill_tokens=0, num_decode_rows=num_rows,
            num_context_tokens=num_context, num_row_layers_executed=sum(layer_tokens),
            num_kv_only_row_layers=sum(layer_kv), num_rule_evals=exits.num_rule_evals,
            rule=self._rule, layer_tokens=layer_tokens, layer_context_tokens=layer_ctx,
            layer_kv_only_tokens=layer_kv, num_layers_run=L - layer_tokens.count(0),
            num_exit_points=exits.num_exit_points, num_attention_pairs=sum(layer_ctx),
            num_sampling_layers=len(set(exits.token_layer) - {None}),
        )  # fmt: skip
        token_ids: list[int | None] | None = None  # only a step that parks needs them
        if parked is not None:
            token_ids = [None if k else r.tokens[p]
                         for r, p, k in zip(self._rows, positions, parked, strict=True)]  # fmt: skip
        return SteadyWork(token_ids, exits.token_layer, exits.is_forced, features, parked)

    def tokens(self, num_steps: int) -> list[list[int]]:
        """Per row, the tokens its first num_steps steps emit (none of them parks)."""
        return [r.tokens[p : p + num_steps] for r, p in zip(self._rows, self._starts, strict=True)]


def _until_eos(
    seqs: SequenceABC[Sequence], rows: list[SeqReplay], starts: list[int], num_steps: int
) -> int:
    """num_steps, cut to end with the first step that emits a row's EOS (it finishes the row)."""
    for seq, row, start in zip(seqs, rows, starts, strict=True):
        eos = seq.eos_token_id
        if eos is not None and eos in row.tokens[start : start + num_steps]:
            num_steps = row.tokens.index(eos, start) - start + 1
    return num_steps
