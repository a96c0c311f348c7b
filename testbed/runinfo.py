"""What every run writes beside its outputs: config, seed, schema version, git commit."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import testbed
from testbed import atomic


def git_commit() -> str | None:
    """The commit of the source tree this package runs from, with '+dirty' when it has edits."""
    root = Path(testbed.__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("+dirty" if dirty else "")


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _torch_version() -> str | None:
    # read from package metadata so torch-free commands (simulate, sweep) need not import it
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def run_info(config: Any, *, seed: int, **extra: Any) -> dict[str, Any]:
    return {
        "config": to_jsonable(config),
        "seed": seed,
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": _torch_version(),
        "argv": [Path(sys.argv[0]).name, *sys.argv[1:]],  # no install path
        **to_jsonable(extra),
    }


def write_run_info(out_dir: Path, config: Any, *, seed: int, **extra: Any) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "run.json"
    atomic.write_json(path, run_info(config, seed=seed, **extra), indent=2)
    return path
