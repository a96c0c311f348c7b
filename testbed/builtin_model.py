"""Where the built-in checkpoint lives (package data) and how a --model value resolves."""

from __future__ import annotations

from pathlib import Path

from testbed.errors import CheckpointError

BUILTIN_NAME = "builtin"
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """'builtin' → the shipped checkpoint; anything else is a checkpoint directory."""
    if str(name_or_path) == BUILTIN_NAME:
        if not (BUILTIN_DIR / "config.json").is_file():
            raise CheckpointError(
                f"the built-in checkpoint is missing from {BUILTIN_DIR.name}/: run `eetb train "
                f"--out {BUILTIN_DIR}` to rebuild it"
            )
        return BUILTIN_DIR
    return Path(name_or_path)
