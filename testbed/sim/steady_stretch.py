"""A steady stretch: the run of steady decode steps (Scheduler.steady_step) of one set of rows
that a simulation replays between two changes of its batch, without plans.

In a long simulation most steps are steady, and a step's own work is tiny (1-30 rows), so what
a step costs is its per-row bookkeeping. A stretch reads its rows' replay lists once and
transposes them, so a step takes its rows' positions and signals as one tuple each; the
scheduler then applies the whole stretch at once (Scheduler.apply_steady_steps). Like
`FastReplay.execute` on each step's plan, for a run whose fill owes nothing (no deferred
positions); tests/test_sim_fastpath.py checks whole simulations agree to the bit. A stretch
whose first step resumes parked rows (rebatch) settles that step from their parked layers,
through `FastReplay.exits` as a planned resume step.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC
from itertools import accumulate

from policies.fast_path import StepExits
from policies.kv_fill import FillKind
from testbed.core.sequence import Sequence
from testbed.sim.cost_base import StepFeatures
from testbed.sim.replay_fast import FastReplay
from testbed.sim.replay_state import SeqReplay
from testbed.sim.step_work import SteadyWork

_FIRST_WINDOW_STEPS = 8  # steps a stretch reads ahead first; measured: rebatch's run ~7


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
        # a resume row (they come first) starts its first step at its parked layer
        self._start_layers = [seq.parked_layer or 0 for seq in seqs]
        self._has_resumes = any(self._start_layers)  # parked layers are exit points, never 0
        self.num_steps = _until_eos(seqs, rows, starts, num_steps)
        # [step][row]: the output index of the token each row produces (< max_tokens, which
        # the replay lists hold: see SeqReplay), and its first confident exit layer; built in
        # doubling windows, as a stretch often ends long before its horizon (a row parks, a
        # request arrives)
        self._positions: list[tuple[int, ...]] = []
        self._confident: list[tuple[int, ...]] | None = None
        if fast.batching.needs_signals:
            self._confident = []
        self._prompts = [r.num_prompt_tokens for r in rows]
        # each row feeds position context - 1; all grow by one a step
        self._num_context = sum(self._prompts) + sum(starts)

    def _read_ahead(self, ahead: int) -> None:
        """Extend the windows to cover step ``ahead`` (and as many steps again)."""
        begin = len(self._positions)
        end = min(self.num_steps, max(ahead + 1, 2 * begin, _FIRST_WINDOW_STEPS))
        starts = self._starts
        self._positions += zip(*[range(p + begin, p + end) for p in starts], strict=True)
        if self._confident is not None:
            columns = [r.confident[p + begin : p + end]
                       for r, p in zip(self._rows, starts, strict=True)]  # fmt: skip
            self._confident += zip(*columns, strict=True)

    def step(self, ahead: int) -> SteadyWork | None:
        """Step ``ahead`` of the stretch; None when the policy has no fast path."""
        fast, L = self._fast, self._fast.num_layers
        if ahead >= len(self._positions):
            self._read_ahead(ahead)
        positions, num_rows = self._positions[ahead], len(self._rows)
        confident = [L] * num_rows if self._confident is None else self._confident[ahead]
        is_resume = self._has_resumes and not ahead
        exits = fast.exits(confident, positions, self._start_layers if is_resume else None)
        if exits is None:
            return None
        parked = exits.parked_layer
        if parked is not None and not any(parked):  # parked layers are exit points, never 0
            parked = None
        executed, num_context = exits.executed, self._num_context + num_rows * ahead
        num_sampling = len(set(exits.token_layer) - {None})
        if not is_resume and parked is None and executed.count(executed[0]) == num_rows:
            features = _uniform_features(num_rows, executed[0], num_context, L, fast.fill,
                                         exits, self._rule, num_sampling)  # fmt: skip
        else:
            contexts = [n + p for n, p in zip(self._prompts, positions, strict=True)]
            starts = self._start_layers if is_resume else [0] * num_rows
            counts = _decode_layer_counts(executed, contexts, starts, L, parked, fast.fill)
            layer_tokens, layer_ctx, layer_kv = counts
            features = StepFeatures(
                num_rows, 0, num_rows, num_context, sum(layer_tokens), sum(layer_kv),
                exits.num_rule_evals, self._rule, layer_tokens, layer_ctx, layer_kv,
                L - layer_tokens.count(0), exits.num_exit_points, sum(layer_ctx), num_sampling,
            )  # fmt: skip
        return SteadyWork(exits.token_layer, exits.is_forced, features, parked)

    def tokens(self, num_steps: int, parked: list[int | None] | None) -> list[list[int]]:
        """Per row, the tokens its first num_steps steps emit; a row parked in the last step
        (``parked``: per row, where) lacks that step's."""
        if parked is None:
            parked = [None] * len(self._rows)
        return [r.tokens[p : p + num_steps - (k is not None)]
                for r, p, k in zip(self._rows, self._starts, parked, strict=True)]  # fmt: skip


def _until_eos(
    seqs: SequenceABC[Sequence], rows: list[SeqReplay], starts: list[int], num_steps: int
) -> int:
    """num_steps, cut to end with the first step that emits a row's EOS (it finishes the row)."""
    for seq, row, start in zip(seqs, rows, starts, strict=True):
        eos = seq.eos_token_id
        if eos is not None and eos in row.tokens[start : start + num_steps]:
            num_steps = row.tokens.index(eos, start) - start + 1
    return num_steps


_LayerCounts = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def _uniform_features(
    rows: int, first: int, num_context: int, L: int, fill: FillKind, exits: StepExits, rule: str,
    num_sampling: int,
) -> StepFeatures:  # fmt: skip
    """A step's features when every row ran the same ``first`` layers and none parked: its
    per-layer counts (those of _decode_layer_counts) and their sums in closed form."""
    rest = L - first  # layers the rows skipped (executed never exceeds L)
    filled = rows if fill.is_filled_now else 0
    # positional, in StepFeatures' field order: most steps of a long simulation come here
    return StepFeatures(
        rows, 0, rows, num_context, rows * first, filled * rest, exits.num_rule_evals, rule,
        (rows,) * first + (0,) * rest, (num_context,) * first + (0,) * rest,
        (0,) * first + (filled,) * rest, first, exits.num_exit_points, num_context * first,
        num_sampling,
    )  # fmt: skip


def _decode_layer_counts(
    executed: list[int], contexts: list[int], start_layers: list[int], L: int,
    parked: list[int | None] | None, fill: FillKind,
) -> _LayerCounts:  # fmt: skip
    """replay_fast's _layer_counts and the K/V-only tokens of its _settle, for one-token
    decode rows with nothing deferred: per layer, tokens run, their context, tokens only
    filled (a parked row owes no fill: its deep layers run when it resumes)."""
    tokens, ctx, kv_only = [0] * (L + 1), [0] * (L + 1), [0] * (L + 1)  # difference arrays
    for r, (start, stop, c) in enumerate(zip(start_layers, executed, contexts, strict=True)):
        tokens[start] += 1
        ctx[start] += c
        tokens[stop] -= 1
        ctx[stop] -= c
        if stop < L and fill.is_filled_now and (parked is None or parked[r] is None):
            kv_only[stop] += 1
            kv_only[L] -= 1
    return (tuple(accumulate(tokens[:L])), tuple(accumulate(ctx[:L])),
            tuple(accumulate(kv_only[:L])))  # fmt: skip
