"""``eetb``: help, unknown verbs, and bad input as one line with exit code 2 (no traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from testbed.cli import VERBS, main


def _eetb(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "testbed.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_help_lists_the_verbs(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: eetb" in out
    for verb in VERBS:
        assert f"  {verb} " in out


def test_help_runs_as_a_module(tmp_path):
    result = _eetb("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert all(verb in result.stdout for verb in VERBS)


def test_unknown_verb_is_one_line_and_exit_2(capsys):
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "unknown verb 'frobnicate'" in err


def test_no_verb_shows_usage_and_fails(capsys):
    assert main([]) == 2
    assert "usage: eetb" in capsys.readouterr().out


def test_train_with_missing_data_dir(tmp_path):
    out = tmp_path / "model"
    result = _eetb("train", "--data-dir", "/nonexistent", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("eetb: error: ")
    assert "/nonexistent" in result.stderr and "--data-dir" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_train_with_empty_data_dir_names_the_missing_file(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    result = _eetb("train", "--data-dir", str(data), "--out", str(tmp_path / "m"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "cnn_dailymail_0shot.jsonl not found" in result.stderr
    assert "Traceback" not in result.stderr
