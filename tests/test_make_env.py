"""The Makefile's environments: .venv by default, PYTHON=... honoured, and the vLLM venv seeing
the main environment's packages (scripts/main_site_pth.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "main_site_pth.py"


def test_pth_names_this_interpreters_site_packages(tmp_path):
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = tmp_path / "venv" / "lib" / version / "site-packages"
    site.mkdir(parents=True)
    run = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "venv")], check=False)
    assert run.returncode == 0
    lines = (site / "eetb_main_env.pth").read_text().splitlines()
    assert sysconfig.get_paths()["purelib"] in lines


def test_pth_refuses_a_folder_that_is_no_venv(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True,
                         text=True, check=False)  # fmt: skip
    assert run.returncode == 2 and "not a folder" in run.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
@pytest.mark.parametrize(
    ("args", "expected"),
    [((), ".venv/bin/python scripts/ensure_torch.py"),
     (("PYTHON=python3",), "python3 scripts/ensure_torch.py")],
)  # fmt: skip
def test_make_install_uses_the_project_venv_unless_python_is_given(args, expected):
    # under `make test` (as in CI) the parent make exports PYTHON and its flags: drop them so
    # this make sees what a user's shell would
    inherited = {"PYTHON", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES"}
    env = {key: value for key, value in os.environ.items() if key not in inherited}
    plan = subprocess.run(["make", "-n", "-B", "install", *args], cwd=REPO, capture_output=True,
                          text=True, check=True, env=env).stdout.splitlines()  # fmt: skip
    assert expected in plan
    assert any(line.endswith("-m venv .venv") for line in plan) == (not args)
