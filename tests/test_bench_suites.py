"""The bench suites as library calls (rows back, run.json beside them) and the verb around them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testbed.bench import capture, sim_speed
from testbed.bench.options import BenchOptions
from testbed.builtin_model import resolve_model_dir
from testbed.commands.bench import main
from testbed.model.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def test_capture_suite_returns_three_timed_runs_of_each_side_and_records_the_ratio(tmp_path):
    lines: list[str] = []
    opts = BenchOptions(out=tmp_path, num_requests=2, max_new_tokens=3, device="cpu")
    times = capture.run(opts, load_checkpoint(resolve_model_dir("builtin")), lines.append)
    assert {k: len(v) for k, v in times.items()} == {"plain": 3, "oracle capture": 3}
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["ratio"] == pytest.approx(min(times["oracle capture"]) / min(times["plain"]))
    assert lines[-1].startswith("oracle capture / plain full-depth generation:")


def test_sim_speed_suite_rows_count_the_requests_it_simulated(tmp_path):
    data_dir = REPO.parent / "shared" / "data"
    if not (data_dir / sim_speed.AZURE_CONV).is_file():
        pytest.skip("the Azure conversation trace is not in the data directory")
    opts = BenchOptions(out=tmp_path, sizes="30", data_dir=str(data_dir),
                        trace=str(REPO / "traces" / "samples" / "oracle_cnndm"))  # fmt: skip
    rows = sim_speed.run(opts, lambda line: None)
    assert [r["num_requests"] for r in rows] == [30, 30]
    assert [r["policy"] for r in rows] == [p.label() for p in sim_speed.POLICIES]
    assert rows[0]["num_steps"] > 0 and rows[0]["simulated_s"] > 0


def test_the_verb_refuses_an_unknown_rule_in_one_line(tmp_path, capsys):
    assert main(["--suite", "early-exit", "--rules", "bogus", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown rule 'bogus'" in err[0]
