"""Find and read the result files of a run folder: a sweep, a validation, or a demo holding both.

Reads files only (DESIGN §3): results.parquet of `eetb sweep`, validation.json and
latencies.parquet of `eetb validate` (validation.json through its records,
testbed.validation_records). A folder from another schema version is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from testbed.errors import EetbError
from testbed.validation_records import ResultsError, ValidationResults


class ReportError(EetbError):
    """A run folder holds nothing to report on, or a result file that cannot be read."""


@dataclass(frozen=True)
class RunData:
    root: Path
    sweep_dir: Path | None = None
    sweep_rows: list[dict[str, Any]] = field(default_factory=list)  # results.parquet
    validation_dir: Path | None = None
    validation: ValidationResults | None = None  # validation.json
    latencies: list[dict[str, Any]] = field(default_factory=list)  # latencies.parquet
    notes: list[str] = field(default_factory=list)  # what is missing or was skipped, and why


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        return pq.read_table(path).to_pylist()
    except (OSError, pa.ArrowInvalid) as exc:
        raise ReportError(f"{path}: not a readable Parquet file ({exc})") from None


def _read_validation(path: Path) -> ValidationResults:
    try:
        return ValidationResults.read(path)
    except ResultsError as exc:
        raise ReportError(str(exc)) from None


def _candidates(root: Path) -> list[Path]:
    return [root, *sorted(p for p in root.iterdir() if p.is_dir())]


def load_run(root: str | Path) -> RunData:
    """The sweep and validation results in root or its immediate subfolders (first found)."""
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"{root}: no such run folder")
    sweep_dir = next((d for d in _candidates(root) if (d / "results.parquet").is_file()), None)
    val_dir = next((d for d in _candidates(root) if (d / "validation.json").is_file()), None)
    if sweep_dir is None and val_dir is None:
        raise ReportError(
            f"{root}: no results.parquet (eetb sweep) or validation.json (eetb validate) in it "
            "or its subfolders"
        )
    notes = []
    rows = _read_parquet(sweep_dir / "results.parquet") if sweep_dir else []
    if sweep_dir is None:
        notes.append("no sweep results: the sweep figures are left out")
    validation, latencies = None, []
    if val_dir is not None:
        validation = _read_validation(val_dir / "validation.json")
        if (val_dir / "latencies.parquet").is_file():
            latencies = _read_parquet(val_dir / "latencies.parquet")
        for m in validation.missing:
            notes.append(f"validation of {m.label} is missing: {m.message}")
    else:
        notes.append("no validation results: the simulated-vs-measured figures are left out")
    return RunData(root, sweep_dir, rows, val_dir, validation, latencies, notes)
