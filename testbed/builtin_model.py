"""Where the built-in checkpoint lives (package data) and how a --model value resolves."""

from __future__ import annotations

from pathlib import Path

from testbed.errors import CheckpointError
from testbed.zoo.spec import KNOWN_MODELS, prepared_dir

BUILTIN_NAME = "builtin"
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """'builtin' → the shipped checkpoint; a known model's name (``smollm2-135m``) → its
    prepared copy in the cache; anything else is a checkpoint directory."""
    if str(name_or_path) == BUILTIN_NAME:
        if not (BUILTIN_DIR / "config.json").is_file():
            raise CheckpointError(
                f"the built-in checkpoint is missing from {BUILTIN_DIR.name}/: run `eetb train "
                f"--out {BUILTIN_DIR}` to rebuild it"
            )
        return BUILTIN_DIR
    if str(name_or_path) in KNOWN_MODELS:
        return prepared_dir(KNOWN_MODELS[str(name_or_path)])
    return Path(name_or_path)
