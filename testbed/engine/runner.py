"""Executes a StepPlan layer by layer, consulting the exit rule, batching and KV-fill policies.

Prefill rows always run every layer. Decode rows are asked the exit rule at each exit point; the
batching policy then says who takes a token, who runs on, who is parked. After the last layer the
KV-fill policy settles the K/V that rows owe to the layers they skipped (DESIGN §4).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from policies.kv_fill import Resolve
from testbed.core.exit_point import RowExits, StepCounters, exit_point
from testbed.core.policy_set import PolicySet
from testbed.core.step import StepPlan, StepResult
from testbed.engine.device import synchronize
from testbed.engine.kv_cache import PagedKVCache, decode_attention, span_attention
from testbed.engine.sampler import Sampler, SamplingParams
from testbed.engine.step_batch import Deferred, StepBatch, build_step_batch
from testbed.model.llama import ExitClassifiers, LlamaModel, exit_logits
from testbed.model.signals import compute_signals


@dataclass(frozen=True)
class SeqMeta:
    num_prompt_tokens: int  # of the original prompt: output position = position + 1 - this
    params: SamplingParams


class StepProbe(Protocol):
    """Observes a step as it runs (trace capture, per-layer profiling); must not change it."""

    def on_step_start(self, batch: StepBatch) -> None: ...

    def on_layer(self, layer: int, batch: StepBatch) -> None:
        """After ``layer`` layers (1-based) ran for the active units."""

    def on_signals(self, layer: int, seq_ids: list[int], signal: str, values: np.ndarray) -> None:
        """The exit rule's signal evaluated at exit point ``layer`` for these sequences."""

    def on_logits(self, layer: int, seq_ids: list[int], logits: torch.Tensor) -> None:
        """The exit-head logits [rows, vocab] these sequences sampled their token from."""

    def on_step_end(self, batch: StepBatch, executed: np.ndarray, filled: np.ndarray) -> None:
        """Per row: layers computed for its newest position and K/V-only layers filled."""


class _Signals:
    """The exit rule's signal from one layer's hidden states (a core.exit_point.SignalSource);
    keeps the exit logits it computed, so the rows that exit sample from them."""

    def __init__(self, runner: ModelRunner, batch: StepBatch, main_prev: torch.Tensor | None):
        self.runner, self.batch, self.main_prev = runner, batch, main_prev
        self.logits: dict[int, torch.Tensor] | None = None

    def signal(self, layer: int, rows: np.ndarray, name: str) -> np.ndarray:
        run, batch = self.runner, self.batch
        rows_t = run._on_device(rows)
        h = batch.hidden[batch.main_unit[rows_t]]
        sig = compute_signals(run.model, run.exit_heads, layer, h, self.main_prev[rows_t],
                              needed=frozenset({name}))  # fmt: skip
        values = getattr(sig.signals, name)
        if run.probe is not None:
            run.probe.on_signals(layer, [batch.rows[r].seq_id for r in rows.tolist()], name, values)
        if sig.logits is not None:
            self.logits = dict(zip(rows.tolist(), sig.logits, strict=True))
        return values


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        exit_heads: ExitClassifiers | None,
        cache: PagedKVCache,
        policies: PolicySet,
        sampler: Sampler,
    ) -> None:
        self.model, self.exit_heads, self.cache = model, exit_heads, cache
        self.policies, self.sampler = policies, sampler
        self.num_layers = model.num_layers
        self.device = cache.device
        self.deferred: dict[int, list[Deferred]] = {}  # owed K/V per sequence (lazy, recompute)
        self.parked: dict[int, torch.Tensor] = {}  # rebatch: hidden state at the parked layer
        self.meta: dict[int, SeqMeta] = {}
        self.probe: StepProbe | None = None  # trace recorders and profilers look in here

    def add_sequence(self, seq_id: int, meta: SeqMeta) -> None:
        self.meta[seq_id] = meta

    def release(self, seq_id: int) -> None:
        """Forget a finished sequence."""
        self.deferred.pop(seq_id, None)
        self.parked.pop(seq_id, None)
        self.meta.pop(seq_id, None)
        self.sampler.release(seq_id)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        start_s = time.perf_counter()
        for row in plan.rows:  # a re-prefill from 0 follows a preemption: old owed state is void
            if row.is_prefill and row.start_position == 0:
                self.deferred.pop(row.seq_id, None)
                self.parked.pop(row.seq_id, None)
        batch = build_step_batch(
            plan, self.model, self.cache.shape.block_size, self.deferred, self.parked
        )
        if self.probe is not None:
            self.probe.on_step_start(batch)
        state = RowExits.start(batch.num_rows, self.num_layers)
        exit_hidden: list[torch.Tensor | None] = [None] * batch.num_rows  # where each row stopped
        positions, max_tokens = self._output_positions(batch), self._max_tokens(batch)
        counters = StepCounters()
        for i in range(self.num_layers):
            if not self._run_layer(batch, state, i, counters, exit_hidden, positions, max_tokens):
                break
        self._take_final_tokens(batch, state, exit_hidden)
        self._settle_deferred(batch, state)
        filled = self._fill(batch, state, exit_hidden, counters)
        if self.probe is not None:
            self.probe.on_step_end(batch, state.executed.copy(), filled)
        rows = tuple(state.result(r, row.seq_id) for r, row in enumerate(batch.rows))
        synchronize(self.device)  # the K/V fill's kernels may still be queued on a GPU
        return counters.result(plan.step_id, rows, time.perf_counter() - start_s)

    def _run_layer(
        self, batch: StepBatch, state: RowExits, i: int, counters: StepCounters,
        exit_hidden: list, positions: np.ndarray, max_tokens: np.ndarray,
    ) -> bool:  # fmt: skip
        running = self._on_device(state.is_running)
        active = (batch.unit_start_layer <= i) & running[batch.unit_row]
        units = active.nonzero().squeeze(1)
        if len(units) == 0:
            return bool(state.is_running.any())
        counters.row_layers += len(units)
        # each active unit's query scores keys 0..position (causal, whatever the kernel pads)
        counters.attention_pairs += int(batch.unit_position[units].sum()) + len(units)
        layer = self.model.layers[i]
        h_in = batch.hidden[units]
        q, k, v = layer.qkv(h_in, batch.cos[units], batch.sin[units])
        self.cache.write(i, batch.unit_slot[units], k, v)
        attn = self._attend(batch, i, units, q)
        main_prev = None  # the hidden-cosine signal compares with the state before this layer
        if self.policies.batching.needs_signals:
            main_prev = batch.hidden[batch.main_unit].clone()
        batch.hidden[units] = layer.finish(h_in, attn)
        if self.probe is not None:
            self.probe.on_layer(i + 1, batch)
        source = _Signals(self, batch, main_prev)
        outcome = exit_point(
            self.policies, i + 1, self.num_layers, state,
            eligible=batch.is_decode_row & (batch.row_start_layer <= i), positions=positions,
            max_tokens=max_tokens, counters=counters, source=source,
        )  # fmt: skip
        if outcome is not None:
            self._sample_rows(batch, state, outcome.takers, i + 1, source.logits)
            for r in outcome.stopping.tolist():
                exit_hidden[r] = batch.hidden[batch.main_unit[r]].clone()
        return True

    def _attend(
        self, batch: StepBatch, i: int, units: torch.Tensor, q: torch.Tensor
    ) -> torch.Tensor:
        """Rows with one active unit share one batched decode attention; the rest go row by row."""
        rows = batch.unit_row[units]
        count = torch.bincount(rows, minlength=batch.num_rows)
        is_single = count[rows] == 1
        out = torch.empty_like(q)
        if bool(is_single.any()):
            sel = is_single.nonzero().squeeze(1)
            out[sel] = decode_attention(self.cache, i, q[sel], batch.decode_ctx, rows[sel])
        for r in torch.unique(rows[~is_single]).tolist():
            sel = (rows == r).nonzero().squeeze(1)
            positions = batch.unit_position[units[sel]]
            out[sel] = span_attention(self.cache, i, q[sel], positions, batch.ctx_slots[r])
        return out

    def _sample_rows(self, batch, state: RowExits, rows: np.ndarray, layer: int, logits) -> None:
        if len(rows) == 0:
            return
        if logits is not None and all(r in logits for r in rows.tolist()):
            row_logits = torch.stack([logits[r] for r in rows.tolist()])
        else:
            h = batch.hidden[batch.main_unit[self._on_device(rows)]]
            row_logits = exit_logits(self.model, self.exit_heads, layer, h)
        seq_ids = [batch.rows[r].seq_id for r in rows.tolist()]
        if self.probe is not None:
            self.probe.on_logits(layer, seq_ids, row_logits)
        tokens = self.sampler.sample(row_logits, seq_ids, [self.meta[s].params for s in seq_ids])
        state.take(rows.tolist(), layer, tokens)

    def _take_final_tokens(self, batch: StepBatch, state: RowExits, exit_hidden: list) -> None:
        """Rows that reached the last layer without a token take the final head's token."""
        rows = state.untaken([row.is_sampling for row in batch.rows])
        self._sample_rows(batch, state, rows, self.num_layers, None)
        for r in range(batch.num_rows):
            if state.is_running[r]:
                exit_hidden[r] = batch.hidden[batch.main_unit[r]]

    def _settle_deferred(self, batch: StepBatch, state: RowExits) -> None:
        """Deferred positions advanced as far as their row ran; fully-run ones are resolved."""
        for seq_id, units in batch.deferred_units.items():
            r = int(batch.unit_row[units[0]])
            left = []
            for d, u in zip(self.deferred[seq_id], units, strict=True):
                reached = max(d.layer, int(state.executed[r]))
                if reached < self.num_layers:
                    left.append(Deferred(d.position, d.token_id, reached, batch.hidden[u].clone()))
            self.deferred[seq_id] = left

    def _fill(
        self, batch: StepBatch, state: RowExits, exit_hidden: list, counters: StepCounters
    ) -> np.ndarray:
        """Apply the KV-fill policy; returns K/V-only layers written per row."""
        filled = np.zeros(batch.num_rows, dtype=np.int64)
        rows = np.array(
            [
                r
                for r in range(batch.num_rows)
                if batch.is_decode_row[r] and state.parked_layer[r] is None
                and state.executed[r] < self.num_layers
            ],
            dtype=np.int64,
        )  # fmt: skip
        for r in np.flatnonzero([p is not None for p in state.parked_layer]).tolist():
            self.parked[batch.rows[r].seq_id] = exit_hidden[r]
        if len(rows) == 0:
            return filled
        fill = self.policies.kv_fill
        decision = fill.decide(executed_layers=state.executed[rows], num_layers=self.num_layers)
        mains = batch.main_unit[self._on_device(rows)]
        h_exit = torch.stack([exit_hidden[r] for r in rows.tolist()])  # [rows, hidden]
        slots = batch.unit_slot[mains]
        for j in range(self.num_layers):
            now = self._on_device(decision.fill_now[:, j])
            if bool(now.any()):
                k, v = self.model.layers[j].kv(
                    h_exit[now], batch.cos[mains][now], batch.sin[mains][now]
                )
                self.cache.write(j, slots[now], k, v)
                counters.kv_only += int(now.sum())
            missing = self._on_device(~decision.fill_now[:, j] & (j >= state.executed[rows]))
            if bool(missing.any()):
                self.cache.invalidate(j, slots[missing])
        self._defer(batch, state, rows, decision.owe, h_exit)
        filled[rows] = decision.fill_now.sum(axis=1)
        return filled

    def _defer(self, batch, state, rows, owe: np.ndarray, h_exit: torch.Tensor) -> None:
        from_layer0 = self.policies.kv_fill.resolve is Resolve.FROM_LAYER0
        for i, r in enumerate(rows.tolist()):
            if not owe[i].any():
                continue
            row = batch.rows[r]
            token = row.token_ids[-1]
            if from_layer0:  # EE-LLM: recompute the position from its layer-0 input
                d = Deferred(
                    row.start_position,
                    token,
                    0,
                    self.model.embed(torch.tensor(token, device=self.device)),
                )
            else:  # FREE: carry the exit state into the deep layers later
                d = Deferred(row.start_position, token, int(state.executed[r]), h_exit[i])
            self.deferred.setdefault(row.seq_id, []).append(d)

    def _on_device(self, a: np.ndarray) -> torch.Tensor:
        """A numpy index or mask, as a tensor beside the tensors it addresses."""
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def _output_positions(self, batch: StepBatch) -> np.ndarray:
        """[rows] output index t of the token each row produces (0: the first generated one)."""
        return np.array([row.start_position + 1 - self.meta[row.seq_id].num_prompt_tokens
                         for row in batch.rows], dtype=np.int64)  # fmt: skip

    def _max_tokens(self, batch: StepBatch) -> np.ndarray:
        return np.array([self.meta[row.seq_id].params.max_tokens for row in batch.rows],
                        dtype=np.int64)  # fmt: skip
