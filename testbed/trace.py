"""Capture directories (DESIGN §6): meta.json + requests / tokens / steps Parquet files.

Writers append row groups to ``NAME.parquet.tmp`` inside ``OUT.partial/`` and only a finished
capture is renamed to ``OUT``; an interrupted one (Ctrl-C) is closed and marked partial, a killed
one leaves only the ``.partial`` folder, which no reader accepts. Readers check the schema version,
the columns and their types, and value ranges, and name the first bad thing they find.
Torch-free: the simulator reads traces too.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from testbed.errors import EetbError
from testbed.jsonfile import read_object
from testbed.locks import exclusive

# 2: steps.parquet gained num_attention_pairs (prefill attention grows with chunk × context)
# 3: steps.parquet gained num_sampling_layers (one sampling call per exit layer a token took)
# 4: steps.parquet gained cpu_s (the process's CPU seconds over the step)
SCHEMA_VERSION = 4
# Older schemas still read: the columns they lack are read as nulls. A column is added here when
# its absence only removes a diagnostic, never a number the simulator or a cost model needs.
ADDED_COLUMNS: dict[tuple[str, str], int] = {("steps", "cpu_s"): 4}
READABLE_VERSIONS = (3, SCHEMA_VERSION)
PARTIAL_SUFFIX = ".partial"
_f32_list = pa.list_(pa.float32())

SCHEMAS: dict[str, pa.Schema] = {
    "requests": pa.schema(
        [
            ("request_id", pa.int64()),
            ("arrival_s", pa.float64()),
            ("num_prompt_tokens", pa.int32()),
            ("num_output_tokens", pa.int32()),
            ("max_tokens", pa.int32()),  # the request's limit (CALM's decaying threshold uses it)
            ("first_token_s", pa.float64()),
            ("finish_s", pa.float64()),
            ("num_preemptions", pa.int32()),
        ]
    ),
    "tokens": pa.schema(
        [
            ("request_id", pa.int64()),
            ("position", pa.int32()),  # output index: 0 is the token the prefill produced
            ("token_id", pa.int32()),
            ("exit_layer", pa.int16()),  # layers run when the token was taken
            ("is_forced", pa.bool_()),
            ("executed_layers", pa.int16()),  # layers computed for this position in its step
            ("filled_layers", pa.int16()),  # K/V-only layers written by the fill policy
            # per exit point 1..L (index l-1); null where not evaluated (live captures)
            ("softmax_margin", _f32_list),
            ("hidden_cosine", _f32_list),
            ("classifier_prob", _f32_list),
            ("matches_final", pa.list_(pa.bool_())),  # layer argmax == emitted token (oracle)
        ]
    ),
    "steps": pa.schema(
        [
            ("step_id", pa.int64()),
            ("start_s", pa.float64()),
            ("duration_s", pa.float64()),
            ("num_rows", pa.int32()),
            ("num_prefill_tokens", pa.int32()),
            ("num_decode_rows", pa.int32()),
            ("num_context_tokens", pa.int64()),
            ("num_row_layers_executed", pa.int64()),
            ("num_kv_only_row_layers", pa.int64()),
            ("num_rule_evals", pa.int64()),
            ("num_forced_exits", pa.int32()),
            ("num_preempted", pa.int32()),
            ("num_layers_run", pa.int16()),  # layers at least one token ran fully
            ("num_exit_points", pa.int16()),  # exit points where the policy decided (batched)
            ("layer_times_s", _f32_list),  # profiling mode only, else null
            # Σ over layers of Σ (position + 1) over the tokens that ran it fully (schema 2)
            ("num_attention_pairs", pa.int64()),
            # distinct layers the step's tokens were taken at: one sampling call each (schema 3)
            ("num_sampling_layers", pa.int16()),
            # CPU seconds of all the process's threads over the step; null where not measured
            # (the simulator, a served vLLM). Beside duration_s it tells the engine's work from
            # the time it waited for a core on a shared machine (schema 4)
            ("cpu_s", pa.float64()),
        ]
    ),
}
TABLES = tuple(SCHEMAS)
SIGNAL_COLUMNS = ("softmax_margin", "hidden_cosine", "classifier_prob")


class TraceError(EetbError):
    """A capture directory is missing, partial, of another schema version, or malformed."""


@dataclass(frozen=True)
class Capture:
    path: Path
    meta: dict[str, Any]
    requests: pa.Table
    tokens: pa.Table
    steps: pa.Table

    @property
    def num_layers(self) -> int:
        return int(self.meta["model"]["num_layers"])

    @property
    def is_partial(self) -> bool:
        return bool(self.meta.get("is_partial"))

    @property
    def oracle_layers(self) -> tuple[int, ...] | None:
        """The layers an oracle capture recorded signals at (captures before meta.json said so
        recorded all); None for a live capture."""
        if self.meta.get("mode") != "oracle":
            return None
        layers = self.meta.get("oracle_layers")
        return tuple(layers) if layers else tuple(range(1, self.num_layers + 1))


class CaptureWriter:
    """Streams the three tables of one capture; use as a context manager."""

    def __init__(self, out: Path, meta: dict[str, Any], *, rows_per_group: int = 4096,
                 flush_interval_s: float = 10.0) -> None:  # fmt: skip
        self.out = Path(out)
        self._lock = ExitStack()  # one writer per --out: a second capture refuses at once
        lock_file = self.out.with_name(f".{self.out.name}.lock")
        refusal = lambda: TraceError(  # noqa: E731
            f"another capture is writing {self.out}; wait for it or choose another --out"
        )
        self._lock.enter_context(exclusive(lock_file, refusal))
        self._lock.callback(lock_file.unlink, missing_ok=True)
        if self.out.exists():
            self._lock.close()
            raise TraceError(f"{self.out} already exists: choose another --out or remove it")
        self.tmp = self.out.with_name(self.out.name + PARTIAL_SUFFIX)
        shutil.rmtree(self.tmp, ignore_errors=True)  # a crashed earlier attempt (we hold the lock)
        self.tmp.mkdir(parents=True)
        self.meta = {**meta, "schema_version": SCHEMA_VERSION}
        self.rows_per_group = rows_per_group
        # row groups also go out by time, so a long capture's data reaches the disk steadily
        self.flush_interval_s = flush_interval_s
        self._last_flush_s = time.monotonic()
        self._buffers: dict[str, list[dict]] = {name: [] for name in TABLES}
        self._writers = {
            name: pq.ParquetWriter(self.tmp / f"{name}.parquet.tmp", SCHEMAS[name])
            for name in TABLES
        }
        self._tokens_per_request: Counter[int] = Counter()
        self._outputs_per_request: dict[int, int] = {}

    def append(self, table: str, row: dict[str, Any]) -> None:
        buf = self._buffers[table]
        buf.append(row)
        if table == "tokens":
            self._tokens_per_request[row["request_id"]] += 1
        elif table == "requests":
            self._outputs_per_request[row["request_id"]] = row["num_output_tokens"]
        if len(buf) >= self.rows_per_group:
            self._flush(table)
        elif time.monotonic() - self._last_flush_s >= self.flush_interval_s:
            for name in TABLES:
                self._flush(name)

    def _flush(self, table: str) -> None:
        self._last_flush_s = time.monotonic()
        if self._buffers[table]:
            batch = pa.Table.from_pylist(self._buffers[table], schema=SCHEMAS[table])
            self._writers[table].write_table(batch)
            self._buffers[table] = []

    def _mismatch(self) -> str | None:
        """Why the tables do not describe finished requests, or None when they do."""
        for rid, n in self._outputs_per_request.items():
            if self._tokens_per_request.get(rid, 0) != n:
                got = self._tokens_per_request.get(rid, 0)
                return f"request {rid} has {got} token rows for {n} output tokens"
        stray = self._tokens_per_request.keys() - self._outputs_per_request.keys()
        if stray:
            return f"{len(stray)} requests have tokens but never finished"
        return None

    def close(self, *, is_partial: bool = False) -> Path:
        """Finish every file, write meta.json last, then move the folder to its final name. A
        capture whose tables do not match its requests is kept, marked partial, and refused."""
        try:
            for name in TABLES:
                self._flush(name)
                self._writers[name].close()
                (self.tmp / f"{name}.parquet.tmp").rename(self.tmp / f"{name}.parquet")
            mismatch = None if is_partial else self._mismatch()
            meta = {**self.meta, "is_partial": is_partial or mismatch is not None}
            (self.tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            self.tmp.rename(self.out)
        finally:
            self._lock.close()
        if mismatch is not None:
            raise TraceError(f"{self.out}: {mismatch}; kept, marked partial")
        return self.out

    def __enter__(self) -> CaptureWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close(is_partial=True)  # what was captured stays readable, marked partial
        else:  # the .partial folder stays behind and is never read as a capture
            self._lock.close()


def read_meta(path: Path) -> dict[str, Any]:
    path = Path(path)
    if path.name.endswith(PARTIAL_SUFFIX):
        raise TraceError(f"{path} is an unfinished capture (its process died); it cannot be read")
    file = path / "meta.json"
    if not file.is_file():
        raise TraceError(f"{path} is not a capture: meta.json is missing")
    meta = read_object(file, TraceError)
    version = meta.get("schema_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        shown = f"{version!r} (a string)" if isinstance(version, str) else repr(version)
        readable = ", ".join(map(str, READABLE_VERSIONS))
        raise TraceError(f"{file}: schema version {shown}, this eetb reads {readable}")
    model = meta.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("config", {}), dict):
        raise TraceError(f"{file}: no 'model' object (not a capture's meta.json)")
    layers = model.get("num_layers")
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise TraceError(f"{file}: model.num_layers is {layers!r}, expected a positive integer")
    return meta


def _read_table(path: Path, name: str, version: int) -> pa.Table:
    file = path / f"{name}.parquet"
    if not file.is_file():
        raise TraceError(f"{file} is missing")
    try:
        table = pq.read_table(file)
    except (pa.ArrowInvalid, OSError) as exc:
        raise TraceError(f"{file} is corrupt or truncated: {exc}") from exc
    expected = SCHEMAS[name]
    for field in expected:
        if (
            field.name not in table.column_names
            and ADDED_COLUMNS.get((name, field.name), 0) > version
        ):
            table = table.append_column(field, pa.nulls(len(table), field.type))
        if field.name not in table.column_names:
            raise TraceError(f"{file}: missing column {field.name!r}")
        actual = table.schema.field(field.name).type
        if actual != field.type:
            raise TraceError(f"{file}: column {field.name!r} is {actual}, expected {field.type}")
    extra = [c for c in table.column_names if c not in expected.names]
    if extra:
        raise TraceError(f"{file}: unexpected column {extra[0]!r}")
    return table.select(expected.names)


def read_capture(path: str | Path, *, allow_partial: bool = False) -> Capture:
    path = Path(path)
    meta = read_meta(path)
    if meta.get("is_partial") and not allow_partial:
        raise TraceError(
            f"{path} is a partial capture (interrupted); read its finished requests with "
            "--allow-partial (allow_partial=True)"
        )
    tables = {name: _read_table(path, name, meta["schema_version"]) for name in TABLES}
    tokens = _tokens_of_requests(path, tables["requests"], tables["tokens"], meta)
    capture = Capture(path, meta, tables["requests"], tokens, tables["steps"])
    validate(capture)
    return capture


def _tokens_of_requests(
    path: Path, requests: pa.Table, tokens: pa.Table, meta: dict[str, Any]
) -> pa.Table:
    """The token rows of the requests in requests.parquet. A partial capture keeps only its
    finished requests' tokens (those still in flight have no request row); a complete one must
    hold exactly num_output_tokens rows per request and no others."""
    rid = requests["request_id"].to_numpy()
    if len(np.unique(rid)) != len(rid):
        raise TraceError(f"{path}/requests.parquet: a request_id appears twice")
    known = pc.is_in(tokens["request_id"], value_set=requests["request_id"]).to_numpy(
        zero_copy_only=False
    )
    if meta.get("is_partial"):
        if len(rid) == 0:
            raise TraceError(f"{path} is a partial capture without one finished request")
        return tokens.filter(pa.array(known))
    stray = _first_bad(~known)
    if stray is not None:
        raise TraceError(
            f"{path}/tokens.parquet: row {stray}: request_id "
            f"{tokens['request_id'][stray].as_py()} has no row in requests.parquet"
        )
    ids, counts = np.unique(tokens["request_id"].to_numpy(), return_counts=True)
    have = dict(zip(ids.tolist(), counts.tolist(), strict=True))
    want = requests["num_output_tokens"].to_numpy()
    for r, n in zip(rid.tolist(), want.tolist(), strict=True):
        if have.get(r, 0) != n:
            raise TraceError(
                f"{path}/requests.parquet: request {r} has {have.get(r, 0)} token rows for "
                f"num_output_tokens {n}"
            )
    return tokens


def _first_bad(mask: np.ndarray) -> int | None:
    idx = np.flatnonzero(mask)
    return int(idx[0]) if len(idx) else None


def _check(file: str, column: str, bad: np.ndarray, what: str) -> None:
    row = _first_bad(bad)
    if row is not None:
        raise TraceError(f"{file}: row {row}: {column} {what}")


def validate(c: Capture) -> None:
    """Value ranges; raises TraceError naming the first bad row."""
    req = {
        k: np.asarray(c.requests[k].to_numpy(zero_copy_only=False)) for k in c.requests.column_names
    }
    for col in ("arrival_s", "first_token_s", "finish_s"):
        _check("requests.parquet", col, ~(req[col] >= 0), "is negative or NaN")
    _check(
        "requests.parquet", "finish_s", req["finish_s"] < req["first_token_s"], "< first_token_s"
    )
    steps = c.steps
    for col in ("start_s", "duration_s"):
        _check("steps.parquet", col, ~(steps[col].to_numpy() >= 0), "is negative or NaN")
    tok = c.tokens
    rid, pos = tok["request_id"].to_numpy(), tok["position"].to_numpy()
    # within each request (rows in file order), positions run 0, 1, 2, ...
    order = np.argsort(rid, kind="stable")
    r = rid[order]
    first = np.r_[True, r[1:] != r[:-1]]
    run_start = np.maximum.accumulate(np.where(first, np.arange(len(r)), 0))
    bad = np.zeros(len(pos), dtype=bool)
    bad[order] = pos[order] != np.arange(len(r)) - run_start

    _check("tokens.parquet", "position", bad, "out of order")
    layers = tok["exit_layer"].to_numpy()
    _check("tokens.parquet", "exit_layer", (layers < 1) | (layers > c.num_layers), "out of range")
    for col in SIGNAL_COLUMNS:
        flat = tok[col].combine_chunks().flatten()
        is_nan = pc.fill_null(pc.is_nan(flat), False).to_numpy(zero_copy_only=False)
        owner = np.repeat(
            np.arange(len(tok)), tok[col].combine_chunks().value_lengths().fill_null(0)
        )
        row = _first_bad(is_nan)
        if row is not None:
            raise TraceError(f"tokens.parquet: row {int(owner[row])}: {col} holds NaN")


def signal_matrix(tokens: pa.Table, column: str, num_layers: int) -> np.ndarray:
    """A list column as float [tokens, num_layers]; NaN where the list or an element is null."""
    arr = tokens[column].combine_chunks()
    lengths = arr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    out = np.full((len(arr), num_layers), math.nan, dtype=np.float64)
    if lengths.sum() == 0:
        return out
    flat = pc.cast(arr.flatten(), pa.float64()).to_numpy(zero_copy_only=False)  # null -> NaN
    rows = np.repeat(np.arange(len(arr)), lengths)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[rows, cols] = flat
    return out


def agreement_by_layer(capture: Capture) -> np.ndarray:
    """Oracle captures: per exit layer 1..L, the fraction of tokens whose argmax there equals
    the emitted (final-layer) token; NaN at the layers the oracle did not record."""
    matches = signal_matrix(capture.tokens, "matches_final", capture.num_layers)
    if np.isnan(matches).all():
        raise TraceError(f"{capture.path} has no matches_final column data: not an oracle capture")
    recorded = ~np.isnan(matches).all(axis=0)  # an oracle of a few exit points leaves NaN columns
    out = np.full(capture.num_layers, np.nan)
    out[recorded] = np.nanmean(matches[:, recorded], axis=0)
    return out
