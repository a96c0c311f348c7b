"""Reading a JSON object file with one clear error: what every config, meta and results file
of the testbed is (their writing half is testbed.atomic.write_json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from testbed.errors import EetbError


def read_object(file: str | Path, error: type[EetbError]) -> dict[str, Any]:
    """The JSON object in ``file``; ``error`` (the caller's typed exception) when the file cannot
    be read, is not JSON, or holds something other than an object."""
    file = Path(file)
    try:
        doc = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise error(f"{file}: expected a JSON object, got {type(doc).__name__}")
    return doc
