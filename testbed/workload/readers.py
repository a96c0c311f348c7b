"""Request-trace files in their public forms: Azure LLM inference CSV (`TIMESTAMP`,
`ContextTokens`, `GeneratedTokens`), Mooncake-style JSONL (`timestamp` in ms, `input_length`,
`output_length`) and Vidur's length-only CSV (`num_prefill_tokens`, `num_decode_tokens`). Read
with the csv and json modules, so that a file a user downloads unchanged behaves as ours do; a
bad file gives one line naming the file and line."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from testbed.datasets import DATA_DIR_ENV
from testbed.errors import WorkloadError
from testbed.workload.arrivals import synthetic_arrivals
from testbed.workload.spec import LengthSpec

log = logging.getLogger(__name__)


AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


MOONCAKE_FIELDS = ("timestamp", "input_length", "output_length")


LENGTH_COLUMNS = ("num_prefill_tokens", "num_decode_tokens")


# Azure writes 100 ns resolution ("18:15:46.6805900"); datetime keeps at most 6 fractional digits
# (and Python 3.10 accepts only 3 or 6), so the fraction is split off and added as a float.
_DATETIME = re.compile(
    r"^(?P<whole>.*?\d\d:\d\d:\d\d)(?:\.(?P<frac>\d+))?(?P<tz>Z|[+-]\d\d:?\d\d)?$"
)


def resolve_path(path: str | Path, data_dir: str | Path | None = None) -> Path:
    """`path` as given if it exists, else under `data_dir` (default: $EETB_DATA_DIR)."""
    given = Path(path)
    if given.exists():
        return given
    root = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    if root and not given.is_absolute() and (Path(root) / given).exists():
        return Path(root) / given
    where = f" or under {root}" if root else f" (set --data-dir or {DATA_DIR_ENV})"
    raise WorkloadError(f"workload file {given} not found{where}")


def _open_text(path: Path):
    if not path.is_file():
        raise WorkloadError(f"workload file {path} not found")
    try:  # utf-8-sig: CSVs saved by Excel start with a byte-order mark
        return path.open(encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise WorkloadError(f"{path}: cannot be read ({exc})") from exc


def _number(value: object, name: str, where: str) -> float:
    """A finite number from a CSV cell or JSON value (str() so that JSON null or true is refused)."""
    try:
        number = float(str(value))
    except ValueError:
        raise WorkloadError(f"{where}: {name} {value!r} is not a number") from None
    if not math.isfinite(number):
        raise WorkloadError(f"{where}: {name} is {value!r}, not a finite number")
    return number


# No served model's context comes near this; a larger count is a corrupt or mis-scaled file.
MAX_TOKEN_COUNT = 10_000_000


def _count(value: object, name: str, where: str) -> int:
    """A non-negative whole number from a CSV cell or JSON value ('12', '12.0', 12)."""
    number = _number(value, name, where)
    if not number.is_integer():
        raise WorkloadError(f"{where}: {name} {value!r} is not a whole number")
    if number < 0:
        raise WorkloadError(f"{where}: {name} is negative ({value})")
    if number > MAX_TOKEN_COUNT:
        raise WorkloadError(f"{where}: {name} {value!r} is over {MAX_TOKEN_COUNT:,} tokens")
    return int(number)


def parse_timestamp_s(text: str, where: str) -> float:
    """Seconds from an ISO date-time of any precision (naive means UTC) or a plain number."""
    match = _DATETIME.match(text.strip())
    try:
        if match is None:
            return _number(text, "TIMESTAMP", where)
        tz = (match["tz"] or "").replace("Z", "+00:00")  # Python 3.10 does not read "Z"
        moment = datetime.fromisoformat(match["whole"] + tz)
    except (ValueError, WorkloadError):
        raise WorkloadError(f"{where}: TIMESTAMP {text!r} is not a date-time or number") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    # float seconds since 1970 keep ~0.25 µs resolution today: ample for arrival times
    return moment.timestamp() + (float(f"0.{match['frac']}") if match["frac"] else 0.0)


def _csv_rows(path: Path, columns: tuple[str, ...]) -> list[tuple[str, dict[str, str]]]:
    """(file:line, row) pairs; the header must name every column in `columns`."""
    rows = []
    try:
        with _open_text(path) as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames:  # None (no bytes) or [] (blank first line)
                raise WorkloadError(f"{path} is empty")
            header = [name.strip() for name in reader.fieldnames]
            for column in columns:
                if column not in header:
                    raise WorkloadError(
                        f"{path}: no column {column!r} (header: {', '.join(header)})"
                    )
            reader.fieldnames = header
            for row in reader:
                # skip blank lines; extra cells land under the key None as a list
                if any(isinstance(v, str) and v.strip() for v in row.values()):
                    rows.append((f"{path}:{reader.line_num}", row))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise WorkloadError(f"{path}: cannot be read ({exc})") from exc
    if not rows:
        raise WorkloadError(f"{path} has a header but no rows")
    return rows


def _cell(row: dict[str, str], column: str, where: str) -> str:
    value = row.get(column)
    if value is None or not value.strip():
        raise WorkloadError(f"{where}: {column} is missing")
    return value.strip()


def _from_first(raw: list[tuple[float, int, int]]) -> list[LengthSpec]:
    """Sort by arrival (stable: equal times keep file order) and measure from the first."""
    times = np.array([r[0] for r in raw])
    num_back = int(np.count_nonzero(np.diff(times) < 0))
    if num_back:  # a merged or shuffled file: replayed in time order, and said so
        log.warning("%d of %d requests are out of arrival order in the file; replayed sorted "
                    "by arrival time", num_back, len(raw))  # fmt: skip
    raw = sorted(raw, key=lambda r: r[0])
    start_s = raw[0][0]
    return [LengthSpec(t - start_s, p, o) for t, p, o in raw]


def read_azure_csv(path: str | Path) -> list[LengthSpec]:
    """Azure LLM inference trace (Splitwise, 2023): TIMESTAMP (absolute date-time or seconds),
    ContextTokens, GeneratedTokens."""
    path = Path(path)
    raw = []
    for where, row in _csv_rows(path, AZURE_COLUMNS):
        arrival_s = parse_timestamp_s(_cell(row, "TIMESTAMP", where), where)
        prompt = _count(_cell(row, "ContextTokens", where), "ContextTokens", where)
        output = _count(_cell(row, "GeneratedTokens", where), "GeneratedTokens", where)
        raw.append((arrival_s, prompt, output))
    return _from_first(raw)


def read_mooncake_jsonl(path: str | Path) -> list[LengthSpec]:
    """Mooncake-style JSONL: one object per line with `timestamp` (ms), `input_length` and
    `output_length`; other fields are ignored."""
    path = Path(path)
    raw = []
    try:
        with _open_text(path) as fh:
            for line_no, line in enumerate(fh, start=1):
                if line.strip():
                    raw.append(_mooncake_row(line, f"{path}:{line_no}"))
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkloadError(f"{path}: cannot be read ({exc})") from exc
    if not raw:
        raise WorkloadError(f"{path} is empty")
    return _from_first(raw)


def _mooncake_row(line: str, where: str) -> tuple[float, int, int]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise WorkloadError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise WorkloadError(f"{where}: expected a JSON object")
    for name in MOONCAKE_FIELDS:
        if name not in obj:
            raise WorkloadError(f"{where}: no field {name!r}")
    arrival_ms = _number(obj["timestamp"], "timestamp", where)
    prompt = _count(obj["input_length"], "input_length", where)
    return arrival_ms / 1000.0, prompt, _count(obj["output_length"], "output_length", where)


def read_length_rows(path: str | Path) -> list[tuple[int, int]]:
    """(prompt, output) token counts from a length-only CSV (Vidur form), in file order."""
    path = Path(path)
    out = []
    for where, row in _csv_rows(path, LENGTH_COLUMNS):
        prompt = _count(_cell(row, LENGTH_COLUMNS[0], where), LENGTH_COLUMNS[0], where)
        output = _count(_cell(row, LENGTH_COLUMNS[1], where), LENGTH_COLUMNS[1], where)
        out.append((prompt, output))
    return out


def read_length_csv(
    path: str | Path, *, rate_per_s: float, cv: float | None = None, seed: int
) -> list[LengthSpec]:
    """A length-only CSV with synthetic arrivals: Poisson, or Gamma when `cv` is given."""
    rows = read_length_rows(path)
    arrivals_s = synthetic_arrivals(rate_per_s, cv, len(rows), seed=seed)
    return [LengthSpec(float(t), p, o) for t, (p, o) in zip(arrivals_s, rows, strict=True)]


log = logging.getLogger(__name__)
