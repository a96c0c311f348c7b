"""A trace from a ``vllm serve`` run: the model's step log joined with what the client saw.

Inside a server the model cannot name the request of a row, so it logs each forward's rows
(position and fed token of the last token, exit layer, signals) to ``record_dir/steps.jsonl``,
and the client keeps each request's prompt, streamed token ids and times. A row produced output
token k of request r when its position is len(prompt) + k - 1 and its fed token is the one at
that position of r's sequence; distinct prompts make that match unique. Step durations are the
model forwards' wall times (the server's scheduling is not seen).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.capture_records import matches_final
from testbed.errors import ConfigError
from testbed.model.signals import SIGNAL_NAMES
from testbed.trace import CaptureWriter
from testbed.vllm_backend.records import RowRecord, StepRecord, steps_row

STEP_LOG = "steps.jsonl"


@dataclass(frozen=True)
class ServedRequest:
    """One request as the HTTP client saw it; times in seconds on the client's run clock."""

    request_id: int
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]  # streamed output tokens
    max_tokens: int
    arrival_s: float
    first_token_s: float
    finish_s: float


def read_step_log(record_dir: Path) -> list[StepRecord]:
    file = Path(record_dir) / STEP_LOG
    if not file.is_file():
        raise ConfigError(f"{file} is missing: was the server started with a record_dir?")
    return [StepRecord.from_json(json.loads(line)) for line in file.read_text().splitlines()]


def _owner(row: RowRecord, requests: Sequence[ServedRequest], taken: set) -> tuple[int, int] | None:
    """(request index, output index) of the token this row produced; None for a prompt chunk."""
    for i, r in enumerate(requests):
        k = row.position - len(r.prompt_token_ids) + 1
        seq = r.prompt_token_ids + r.token_ids
        is_match = 0 <= k < len(r.token_ids) and seq[row.position] == row.input_token_id
        if is_match and (i, k) not in taken:
            return i, k
    return None


def write_served_capture(
    record_dir: Path,
    requests: Sequence[ServedRequest],
    meta: dict[str, Any],
    out: Path,
    *,
    run_start_unix_s: float,
) -> Path:
    """Join the server's step log with the client's requests into the capture ``out``."""
    steps = [s for s in read_step_log(record_dir) if s.rows]
    num_layers = int(meta["model"]["num_layers"])
    tokens: dict[tuple[int, int], dict] = {}
    with CaptureWriter(out, meta) as writer:
        for step_id, step in enumerate(steps):
            writer.append(
                "steps",
                steps_row(
                    step_id, max(0.0, step.start_unix_s - run_start_unix_s), step.forward_s, step
                ),
            )
            for row in step.rows:
                owner = _owner(row, requests, set(tokens))
                if owner is not None:
                    tokens[owner] = _token_row(requests[owner[0]], owner[1], row, num_layers)
        for i, r in enumerate(requests):
            for k in range(len(r.token_ids)):
                if (i, k) not in tokens:
                    raise ConfigError(f"request {r.request_id}: no logged row produced token {k}")
                writer.append("tokens", tokens[i, k])
            writer.append("requests", {
                "request_id": r.request_id, "arrival_s": r.arrival_s,
                "num_prompt_tokens": len(r.prompt_token_ids), "num_output_tokens": len(r.token_ids),
                "max_tokens": r.max_tokens, "first_token_s": r.first_token_s,
                "finish_s": r.finish_s, "num_preemptions": 0,
            })  # fmt: skip
    return out


def _token_row(r: ServedRequest, k: int, row: RowRecord, num_layers: int) -> dict:
    token = r.token_ids[k]
    return {
        "request_id": r.request_id, "position": k, "token_id": token,
        "exit_layer": row.exit_layer if row.is_decode else num_layers,
        "is_forced": row.is_forced, "executed_layers": row.executed_layers,
        "filled_layers": row.filled_layers,
        **{name: row.signals.get(name) for name in SIGNAL_NAMES},
        "matches_final": matches_final(row.argmax, token),
    }  # fmt: skip
