"""What one forward of the early-exit model did, row by row: the trace's raw material.

Rows are vLLM's scheduled requests in batch order (the order of ``ModelRunnerOutput.req_ids``).
Torch-free so that the step log of a ``vllm serve`` process can be read anywhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class RowRecord:
    is_decode: bool  # one query token: its token may exit early (prompt rows never do)
    num_query_tokens: int  # tokens this row fed in the forward
    position: int  # position of the row's last fed token
    input_token_id: int  # the row's last fed token (a decode row's previous output)
    exit_layer: int  # layers run when the row's token was taken (num_layers: full depth)
    is_forced: bool  # quorum forced the token out before it was confident
    executed_layers: int  # full layers computed for the row's last token
    filled_layers: int  # K/V-only layers written for it (copy fill)
    signals: dict[str, list[float | None]] = field(default_factory=dict)  # name -> per layer
    argmax: list[int] | None = None  # oracle: the exit head's argmax after layer 1..L


@dataclass(frozen=True)
class StepRecord:
    rows: tuple[RowRecord, ...]
    num_row_layers_executed: int  # full layers summed over every token of the forward
    num_kv_only_row_layers: int
    num_rule_evals: int
    num_forced_exits: int
    num_exit_points: int
    num_layers_run: int  # layers at least one token ran fully
    forward_s: float  # wall time of the model forward
    start_unix_s: float = 0.0  # time.time() when the forward began (joins a `vllm serve` log)
    # an oracle recording's own work in the forward (its LM heads), taken out of the step's time
    # so its steps time a plain full-depth forward
    recording_s: float = 0.0
    recording_cpu_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(raw: dict[str, Any]) -> StepRecord:
        rows = tuple(RowRecord(**r) for r in raw["rows"])
        return StepRecord(**{**raw, "rows": rows})


def steps_row(
    step_id: int, start_s: float, duration_s: float, step: StepRecord, cpu_s: float | None = None
) -> dict[str, Any]:
    """One row of a capture's steps table (testbed.trace schema) from a forward's record;
    ``cpu_s`` is the process's CPU seconds over the step where the caller measured it."""
    return {
        "step_id": step_id, "start_s": start_s,
        "duration_s": max(0.0, duration_s - step.recording_s),
        "num_rows": len(step.rows),
        "num_prefill_tokens": sum(r.num_query_tokens for r in step.rows if not r.is_decode),
        "num_decode_rows": sum(r.is_decode for r in step.rows),
        "num_context_tokens": sum(r.position + 1 for r in step.rows),
        "num_row_layers_executed": step.num_row_layers_executed,
        "num_kv_only_row_layers": step.num_kv_only_row_layers,
        "num_rule_evals": step.num_rule_evals, "num_forced_exits": step.num_forced_exits,
        "num_preempted": 0,  # vLLM does not report it per step
        "num_layers_run": step.num_layers_run, "num_exit_points": step.num_exit_points,
        "layer_times_s": None,
        "num_attention_pairs": sum(_attention_pairs(r) for r in step.rows),
        # every row's exit layer: a prompt chunk's row counts its (full-depth) layer too
        "num_sampling_layers": len({r.exit_layer for r in step.rows}),
        "cpu_s": None if cpu_s is None else max(0.0, cpu_s - step.recording_cpu_s),
    }  # fmt: skip


def _attention_pairs(row: RowRecord) -> int:
    """Causal (query, key) pairs of a row's fed tokens over the layers it ran fully: token p
    scores keys 0..p, and the fed tokens end at ``row.position``."""
    n, last = row.num_query_tokens, row.position
    return (n * (last + 1) - n * (n - 1) // 2) * row.executed_layers
