"""Let the vLLM environment see this interpreter's packages (torch, eetb) after its own.

`python -m venv --system-site-packages` run from a virtual environment links the *base*
interpreter's site-packages, not the environment's, so the vLLM venv would miss the torch and
the editable eetb that `make install` put into `.venv`. A .pth file in the vLLM venv that names
this interpreter's site folders appends them to its sys.path: its own pins (numpy,
transformers) still win, as they do over system site-packages.

Usage: python scripts/main_site_pth.py VLLM_VENV
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

PTH_NAME = "eetb_main_env.pth"


def site_folders() -> list[str]:
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["purelib"], paths["platlib"]]))


def venv_site_packages(venv: Path) -> Path:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return venv / "lib" / version / "site-packages"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: main_site_pth.py VLLM_VENV", file=sys.stderr)
        return 2
    target = venv_site_packages(Path(argv[0]))
    if not target.is_dir():
        print(
            f"main_site_pth: {target} is not a folder (not a venv of this Python?)", file=sys.stderr
        )
        return 2
    (target / PTH_NAME).write_text("".join(f"{p}\n" for p in site_folders()), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
