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
from testbed.core.policy_set import PolicySet
from testbed.core.step import RowResult, StepPlan, StepResult
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

    def on_step_end(self, batch: StepBatch, executed: np.ndarray, filled: np.ndarray) -> None:
        """Per row: layers computed for its newest position and K/V-only layers filled."""


@dataclass
class _RowState:
    """Per-row outcome of the step so far (numpy, [rows])."""

    is_running: np.ndarray  # still computing layers
    token: list[int | None]
    exit_layer: list[int | None]
    is_forced: np.ndarray
    parked_layer: list[int | None]
    executed: np.ndarray  # layers computed for the row's newest position
    exit_hidden: list[torch.Tensor | None]  # main unit's state where it stopped


@dataclass
class _Counters:
    row_layers: int = 0
    kv_only: int = 0
    rule_evals: int = 0
    forced: int = 0
    exit_points: int = 0
    attention_pairs: int = 0


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
        state = _RowState(
            is_running=np.ones(batch.num_rows, dtype=bool),
            token=[None] * batch.num_rows,
            exit_layer=[None] * batch.num_rows,
            is_forced=np.zeros(batch.num_rows, dtype=bool),
            parked_layer=[None] * batch.num_rows,
            executed=np.full(batch.num_rows, self.num_layers),
            exit_hidden=[None] * batch.num_rows,
        )
        counters = _Counters()
        for i in range(self.num_layers):
            if not self._run_layer(batch, state, i, counters):
                break
        self._take_final_tokens(batch, state)
        self._settle_deferred(batch, state)
        filled = self._fill(batch, state, counters)
        if self.probe is not None:
            self.probe.on_step_end(batch, state.executed.copy(), filled)
        rows = tuple(self._row_result(batch, state, r) for r in range(batch.num_rows))
        synchronize(self.device)  # the K/V fill's kernels may still be queued on a GPU
        return StepResult(
            step_id=plan.step_id,
            rows=rows,
            num_row_layers_executed=counters.row_layers,
            num_kv_only_row_layers=counters.kv_only,
            num_rule_evals=counters.rule_evals,
            num_forced_exits=counters.forced,
            num_exit_points=counters.exit_points,
            num_attention_pairs=counters.attention_pairs,
            duration_s=time.perf_counter() - start_s,
        )

    def _run_layer(self, batch: StepBatch, state: _RowState, i: int, counters: _Counters) -> bool:
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
        self._exit_point(batch, state, i + 1, main_prev, counters)
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

    def _exit_point(
        self,
        batch: StepBatch,
        state: _RowState,
        layer: int,
        main_prev: torch.Tensor | None,
        counters: _Counters,
    ) -> None:
        p = self.policies
        if not p.batching.is_early_exit or layer >= self.num_layers:
            return
        if not p.exit_points.is_exit_point(layer, self.num_layers):
            return
        cand = np.flatnonzero(
            state.is_running & batch.is_decode_row & (batch.row_start_layer < layer)
        )
        if len(cand) == 0:
            return
        has_token = np.array([state.token[r] is not None for r in cand])
        positions = self._output_positions(batch, cand)
        confident = np.zeros(len(cand), dtype=bool)
        logits = None
        need = cand[~has_token]
        if p.batching.needs_signals and len(need):
            need_t = self._on_device(need)
            h = batch.hidden[batch.main_unit[need_t]]
            sig = compute_signals(
                self.model, self.exit_heads, layer, h, main_prev[need_t],
                needed=frozenset({p.exit_rule.signal}),
            )  # fmt: skip
            counters.rule_evals += len(need)
            if self.probe is not None:
                values = getattr(sig.signals, p.exit_rule.signal)
                self.probe.on_signals(
                    layer, [batch.rows[r].seq_id for r in need], p.exit_rule.signal, values
                )
            confident[~has_token] = p.exit_rule.confident(
                sig.signals,
                positions=positions[~has_token],
                max_tokens=self._max_tokens(batch, need),
            )
            logits = (
                dict(zip(need.tolist(), sig.logits, strict=True))
                if sig.logits is not None
                else None
            )
        counters.exit_points += 1
        decision = p.batching.decide(
            layer=layer,
            num_layers=self.num_layers,
            confident=confident,
            has_token=has_token,
            positions=positions,
        )
        self._apply_decision(batch, state, cand, decision, layer, logits, counters)

    def _apply_decision(self, batch, state, cand, decision, layer, logits, counters) -> None:
        takers = cand[decision.take_token]
        self._sample_rows(batch, state, takers, layer, logits)
        state.is_forced[cand[decision.is_forced]] = True
        counters.forced += int(decision.is_forced.sum())
        stopping = cand[~decision.keep_running]
        for r in stopping.tolist():
            state.is_running[r] = False
            state.executed[r] = layer
            state.exit_hidden[r] = batch.hidden[batch.main_unit[r]].clone()
        for r in cand[decision.park].tolist():
            state.parked_layer[r] = layer

    def _sample_rows(self, batch, state, rows: np.ndarray, layer: int, logits) -> None:
        if len(rows) == 0:
            return
        if logits is not None and all(r in logits for r in rows.tolist()):
            row_logits = torch.stack([logits[r] for r in rows.tolist()])
        else:
            h = batch.hidden[batch.main_unit[self._on_device(rows)]]
            row_logits = exit_logits(self.model, self.exit_heads, layer, h)
        seq_ids = [batch.rows[r].seq_id for r in rows.tolist()]
        tokens = self.sampler.sample(row_logits, seq_ids, [self.meta[s].params for s in seq_ids])
        for r, t in zip(rows.tolist(), tokens, strict=True):
            state.token[r], state.exit_layer[r] = t, layer

    def _take_final_tokens(self, batch: StepBatch, state: _RowState) -> None:
        """Rows that reached the last layer without a token take the final head's token."""
        rows = [
            r
            for r, row in enumerate(batch.rows)
            if row.is_sampling and state.token[r] is None and state.parked_layer[r] is None
        ]
        self._sample_rows(batch, state, np.array(rows, dtype=np.int64), self.num_layers, None)
        for r in range(batch.num_rows):
            if state.is_running[r]:
                state.exit_hidden[r] = batch.hidden[batch.main_unit[r]]

    def _settle_deferred(self, batch: StepBatch, state: _RowState) -> None:
        """Deferred positions advanced as far as their row ran; fully-run ones are resolved."""
        for seq_id, units in batch.deferred_units.items():
            r = int(batch.unit_row[units[0]])
            left = []
            for d, u in zip(self.deferred[seq_id], units, strict=True):
                reached = max(d.layer, int(state.executed[r]))
                if reached < self.num_layers:
                    left.append(Deferred(d.position, d.token_id, reached, batch.hidden[u].clone()))
            self.deferred[seq_id] = left

    def _fill(self, batch: StepBatch, state: _RowState, counters: _Counters) -> np.ndarray:
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
            self.parked[batch.rows[r].seq_id] = state.exit_hidden[r]
        if len(rows) == 0:
            return filled
        fill = self.policies.kv_fill
        decision = fill.decide(executed_layers=state.executed[rows], num_layers=self.num_layers)
        mains = batch.main_unit[self._on_device(rows)]
        h_exit = torch.stack([state.exit_hidden[r] for r in rows.tolist()])  # [rows, hidden]
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

    def _output_positions(self, batch: StepBatch, rows: np.ndarray) -> np.ndarray:
        """Output index t of the token each row produces (0 for the first generated token)."""
        return np.array(
            [
                batch.rows[r].start_position + 1 - self.meta[batch.rows[r].seq_id].num_prompt_tokens
                for r in rows.tolist()
            ]
        )

    def _max_tokens(self, batch: StepBatch, rows: np.ndarray) -> np.ndarray:
        seq_ids = [batch.rows[r].seq_id for r in rows.tolist()]
        return np.array([self.meta[s].params.max_tokens for s in seq_ids])

    def _row_result(self, batch: StepBatch, state: _RowState, r: int) -> RowResult:
        row = batch.rows[r]
        parked = state.parked_layer[r]
        token = None if parked is not None else state.token[r]
        return RowResult(
            seq_id=row.seq_id,
            token_id=token,
            exit_layer=state.exit_layer[r] if token is not None else None,
            is_forced=bool(state.is_forced[r]),
            is_parked=parked is not None,
            parked_layer=parked,
        )
