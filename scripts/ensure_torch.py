"""Make sure `import torch` works, without ever replacing a torch the user already has.

pyproject.toml does not list torch: a plain `torch` requirement makes pip replace a user's CUDA
build, or pull a multi-GB CUDA build onto a CPU-only machine. So this script keeps any importable
torch as it is, and only when none is installed asks pip for the release the project is tested
with (a CPU build where the package index offers one). Exit 0 when torch imports afterwards, 1
otherwise, with one line saying why.
"""

from __future__ import annotations

import subprocess
import sys

TORCH_REQUIREMENT = "torch==2.13.0"  # the release the test suite and the built-in model use


def describe_installed() -> str | None:
    """'torch X (cuda Y) at PATH' for an importable torch; None when torch is not installed."""
    try:
        import torch
    except ModuleNotFoundError as exc:
        if exc.name != "torch":  # torch is there but one of its own dependencies is missing
            raise
        return None
    build = f"cuda {torch.version.cuda}" if torch.version.cuda else "cpu"
    return f"torch {torch.__version__} ({build}) at {torch.__file__}"


def install() -> bool:
    cmd = [sys.executable, "-m", "pip", "install", TORCH_REQUIREMENT]
    print("ensure_torch: no torch importable; running: " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=False).returncode == 0


def imports_in_fresh_interpreter() -> bool:
    probe = "import torch; print('ensure_torch: installed torch', torch.__version__)"
    return subprocess.run([sys.executable, "-c", probe], check=False).returncode == 0


def main() -> int:
    try:
        kept = describe_installed()
    except Exception as exc:  # a broken install: never overwrite it, say what failed
        print(
            f"ensure_torch: torch is installed but fails to import ({exc}); fix or "
            "uninstall it and run again",
            file=sys.stderr,
        )
        return 1
    if kept is not None:
        print(f"ensure_torch: keeping {kept}")
        return 0
    if install() and imports_in_fresh_interpreter():
        return 0
    print(
        f"ensure_torch: could not install {TORCH_REQUIREMENT} with pip; install a torch "
        "build for this machine by hand (https://pytorch.org) and run again",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
