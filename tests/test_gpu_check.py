"""scripts/gpu_check.sh as far as a CPU runs it: every step on the built-in model, with the
device, model and sizes its knobs set, and one summary holding each step's status."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_gpu_check_runs_every_step_on_the_cpu(tmp_path):
    env = os.environ | {
        "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_MODEL": "builtin", "GPU_CHECK_REQUESTS": "4",
        "GPU_CHECK_SKIP_INSTALL": "1", "PYTHON": sys.executable,
    }  # fmt: skip
    out = tmp_path / "check"
    result = subprocess.run(["bash", "scripts/gpu_check.sh", str(out)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    summary = (out / "summary.md").read_text()
    status = dict(re.findall(r"^### ([\w-]+): rc (\d+)", summary, flags=re.M))
    expected = {"gpu-tests", "throughput", "oracle", "validate"}
    assert expected <= status.keys() and all(status[k] == "0" for k in expected), summary
    assert "vs transformers" in summary and "Kendall tau" in summary
    assert (out / "oracle" / "meta.json").is_file() and (out / "validate").is_dir()
