"""The measured side: a live capture's requests as the simulator's records, its outputs, and
their agreement with `full`'s."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from testbed.sim.metrics import RequestRecord
from testbed.trace import Capture


def live_records(cap: Capture) -> list[RequestRecord]:
    """The requests of a live capture as the simulator's records, with their real exit layers."""
    tokens = cap.tokens.sort_by([("request_id", "ascending"), ("position", "ascending")])
    rid = tokens["request_id"].to_numpy()
    layers = tokens["exit_layer"].to_numpy()
    forced = tokens["is_forced"].to_numpy()
    bounds = np.flatnonzero(np.r_[True, rid[1:] != rid[:-1], True]) if len(rid) else []
    spans = {int(rid[a]): (a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)}
    records = []
    for r in cap.requests.to_pylist():
        a, b = spans.get(r["request_id"], (0, 0))
        records.append(RequestRecord(
            request_id=r["request_id"], arrival_s=r["arrival_s"],
            first_token_s=r["first_token_s"], finish_s=r["finish_s"],
            num_prompt_tokens=r["num_prompt_tokens"], num_output_tokens=r["num_output_tokens"],
            exit_layers=tuple(int(x) for x in layers[a:b]),
            num_forced_exits=int(forced[a:b].sum()), num_preemptions=r["num_preemptions"],
        ))  # fmt: skip
    return records


def capture_outputs(cap: Capture) -> dict[int, list[int]]:
    """Emitted token ids per request id, in order."""
    out: dict[int, list[int]] = {}
    tokens = cap.tokens.sort_by([("request_id", "ascending"), ("position", "ascending")])
    for rid, tok in zip(
        tokens["request_id"].to_pylist(), tokens["token_id"].to_pylist(), strict=True
    ):
        out.setdefault(rid, []).append(tok)
    return out


def agreement_with(outputs: dict[int, list[int]], full: dict[int, list[int]]) -> float:
    """Token-weighted fraction of positions equal to the `full` run's output."""
    same = total = 0
    for rid, ids in outputs.items():
        ref = full.get(rid, [])
        total += max(len(ids), len(ref))
        same += sum(x == y for x, y in zip(ids, ref, strict=False))
    return same / total if total else 1.0


def _latency_rows(label: str, source: str, records: Sequence[RequestRecord]) -> list[dict]:
    rows = []
    for r in records:
        n = r.num_output_tokens
        tpot = (r.finish_s - r.first_token_s) / (n - 1) if n > 1 else None
        rows.append({"policy": label, "source": source, "request_id": r.request_id,
                     "ttft_s": r.first_token_s - r.arrival_s, "tpot_s": tpot,
                     "e2e_s": r.finish_s - r.arrival_s})  # fmt: skip
    return rows
