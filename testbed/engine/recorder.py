"""Trace capture from the native engine: a probe inside the runner and a recorder of its steps.

``oracle`` mode runs full depth and records, for every generated token and every exit point, the
signals of all three rules and that layer's argmax, so any rule and λ can be replayed offline.
``live`` mode records what the policy did: exit layers, forced exits, executed and filled layers,
and the rule's signal where it was evaluated.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from testbed.capture_records import RequestOutput, matches_final
from testbed.core.step import StepPlan, StepResult
from testbed.engine.step_batch import StepBatch
from testbed.model.llama import ExitClassifiers, LlamaModel
from testbed.model.signals import SIGNAL_NAMES, oracle_signals
from testbed.trace import CaptureWriter


@dataclass
class RowTrace:
    executed_layers: int = 0
    filled_layers: int = 0
    # oracle: signal -> value after layer 1..L, None at the layers it does not record
    signals: dict[str, list[float | None]] = field(default_factory=dict)
    argmax: list[int | None] | None = None  # oracle: the exit head's argmax after layer 1..L


class TraceProbe:
    """Implements the runner's StepProbe protocol."""

    def __init__(self, model: LlamaModel, heads: ExitClassifiers | None, *, is_oracle: bool,
                 profile_layers: bool, oracle_layers: tuple[int, ...] = ()) -> None:  # fmt: skip
        self.model, self.heads = model, heads
        self.is_oracle, self.profile_layers = is_oracle, profile_layers
        # the layers an oracle records (1-based, ascending); default: every layer
        self.oracle_layers = oracle_layers or tuple(range(1, model.config.num_hidden_layers + 1))
        self.rows: dict[int, RowTrace] = {}
        # signals of a sequence's pending token, kept across steps (a parked row resumes later)
        self.pending: dict[int, dict[str, dict[int, float]]] = {}
        self.layer_times_s: list[float] | None = None
        self._seq_ids: list[int] = []
        self._mains = torch.empty(0, dtype=torch.long)
        self._states: list[torch.Tensor] = []
        self._stamps: list[float] = []
        self.num_layers_run = 0  # layers with any active token in the current step

    def on_step_start(self, batch: StepBatch) -> None:
        sampling = [r for r, row in enumerate(batch.rows) if row.is_sampling]
        self._seq_ids = [batch.rows[r].seq_id for r in sampling]
        self._mains = batch.main_unit[sampling]
        self.rows = {s: RowTrace() for s in self._seq_ids}
        self._states = [batch.hidden[self._mains].clone()] if self.is_oracle else []
        self._stamps = [time.perf_counter()]
        self._final_logits: dict[int, torch.Tensor] = {}
        self.num_layers_run = 0
        self.recording_s = self.recording_cpu_s = 0.0  # this step's oracle work, see _timed

    def on_layer(self, layer: int, batch: StepBatch) -> None:
        self.num_layers_run += 1
        if self.is_oracle:
            with self._timed():
                self._states.append(batch.hidden[self._mains].clone())
        if self.profile_layers:
            self._stamps.append(time.perf_counter())

    def on_signals(self, layer: int, seq_ids: list[int], signal: str, values: np.ndarray) -> None:
        for s, v in zip(seq_ids, values.tolist(), strict=True):
            self.pending.setdefault(s, {}).setdefault(signal, {})[layer] = v

    def on_logits(self, layer: int, seq_ids: list[int], logits: torch.Tensor) -> None:
        # an oracle samples at the last layer: its LM head call there is the oracle's too
        if self.is_oracle and layer == self.model.config.num_hidden_layers:
            self._final_logits.update(zip(seq_ids, logits, strict=True))

    def on_step_end(self, batch: StepBatch, executed: np.ndarray, filled: np.ndarray) -> None:
        seq_to_row = {row.seq_id: r for r, row in enumerate(batch.rows)}
        for s, trace in self.rows.items():
            trace.executed_layers = int(executed[seq_to_row[s]])
            trace.filled_layers = int(filled[seq_to_row[s]])
        self.layer_times_s = np.diff(self._stamps).tolist() if self.profile_layers else None
        if self.is_oracle and self._seq_ids:
            with self._timed():
                self._oracle_signals()

    @contextlib.contextmanager
    def _timed(self) -> Iterator[None]:
        """Count the oracle's own work (an LM head at every recorded layer): the recorder takes
        it out of the step's time, so an oracle's steps time what a plain full-depth step does,
        which a cost model fitted on them must see. The oracle's numpy reads synchronise."""
        start_s, start_cpu_s = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.recording_s += time.perf_counter() - start_s
            self.recording_cpu_s += time.process_time() - start_cpu_s

    def _oracle_signals(self) -> None:
        final = None
        if all(s in self._final_logits for s in self._seq_ids):
            final = torch.stack([self._final_logits[s] for s in self._seq_ids])
        oracle = oracle_signals(
            torch.stack(self._states), self.oracle_layers,
            final_norm=self.model.model.norm,
            logits_of=lambda h: F.linear(h, self.model.lm_head_weight()),
            heads=self.heads, eps=self.model.config.rms_norm_eps, final_logits=final,
        )  # fmt: skip
        for i, s in enumerate(self._seq_ids):
            self.rows[s].signals = oracle.signals[i]
            self.rows[s].argmax = oracle.argmax[i]


def _as_list(values: dict[int, float] | None, num_layers: int) -> list[float | None] | None:
    if not values:
        return None
    return [values.get(layer) for layer in range(1, num_layers + 1)]


class TraceRecorder:
    """Turns each engine step (plan, result, probe) into rows of a CaptureWriter."""

    def __init__(self, writer: CaptureWriter, probe: TraceProbe, num_layers: int,
                 request_ids: dict[int, int], max_tokens: dict[int, int]) -> None:  # fmt: skip
        self.writer, self.probe, self.num_layers = writer, probe, num_layers
        self.request_ids = request_ids  # engine seq_id -> workload request id
        self.max_tokens = max_tokens  # engine seq_id -> the request's max_tokens
        self._positions: dict[int, int] = {}
        self._start = time.perf_counter()
        self.num_tokens = 0

    def on_step(self, plan: StepPlan, result: StepResult) -> None:
        now = time.perf_counter() - self._start
        probe = self.probe  # an oracle's own recording is not the step's work (TraceProbe._timed)
        cpu_s = None if result.cpu_s is None else max(0.0, result.cpu_s - probe.recording_cpu_s)
        self.writer.append("steps", {
            "step_id": plan.step_id, "start_s": max(0.0, now - result.duration_s),
            "duration_s": max(0.0, result.duration_s - probe.recording_s),
            "num_rows": len(plan.rows),
            "num_prefill_tokens": plan.num_prefill_tokens, "num_decode_rows": plan.num_decode_rows,
            "num_context_tokens": plan.num_context_tokens,
            "num_row_layers_executed": result.num_row_layers_executed,
            "num_kv_only_row_layers": result.num_kv_only_row_layers,
            "num_rule_evals": result.num_rule_evals, "num_forced_exits": result.num_forced_exits,
            "num_preempted": plan.num_preempted, "num_layers_run": self.probe.num_layers_run,
            "num_exit_points": result.num_exit_points,
            "layer_times_s": self.probe.layer_times_s,
            "num_attention_pairs": result.num_attention_pairs,
            "num_sampling_layers": result.num_sampling_layers, "cpu_s": cpu_s,
        })  # fmt: skip
        for row in result.rows:
            if row.token_id is not None:
                self._token(row)

    def _token(self, row) -> None:
        trace = self.probe.rows.get(row.seq_id, RowTrace())
        if self.probe.is_oracle:
            signals = trace.signals
        else:
            pending = self.probe.pending.pop(row.seq_id, {})
            signals = {name: _as_list(v, self.num_layers) for name, v in pending.items()}
        position = self._positions.get(row.seq_id, 0)
        self._positions[row.seq_id] = position + 1
        self.writer.append("tokens", {
            "request_id": self.request_ids[row.seq_id], "position": position,
            "token_id": row.token_id, "exit_layer": row.exit_layer, "is_forced": row.is_forced,
            "executed_layers": trace.executed_layers, "filled_layers": trace.filled_layers,
            **{name: signals.get(name) for name in SIGNAL_NAMES},
            "matches_final": matches_final(trace.argmax, row.token_id),
        })  # fmt: skip
        self.num_tokens += 1

    def on_finish(self, out: RequestOutput) -> None:
        self.writer.append("requests", {
            "request_id": self.request_ids[out.seq_id], "arrival_s": out.arrival_s,
            "num_prompt_tokens": len(out.prompt_token_ids), "num_output_tokens": len(out.token_ids),
            "max_tokens": self.max_tokens[out.seq_id],
            "first_token_s": out.first_token_s, "finish_s": out.finish_s,
            "num_preemptions": out.num_preemptions,
        })  # fmt: skip
