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


def test_capture_suite_times_both_oracles_against_plain_and_records_the_ratios(tmp_path):
    lines: list[str] = []
    opts = BenchOptions(out=tmp_path, num_requests=2, max_new_tokens=3, device="cpu")
    times = capture.run(opts, load_checkpoint(resolve_model_dir("builtin")), lines.append)
    sparse = "oracle at 2 exit points"  # 8 layers: half the depth, then every third: 4 and 7
    assert {k: len(v) for k, v in times.items()} == {"plain": 3, "oracle, every layer": 3,
                                                     sparse: 3}  # fmt: skip
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["sparse_layers"] == [4, 7]
    for name in ("oracle, every layer", sparse):
        assert info["ratios"][name] == pytest.approx(min(times[name]) / min(times["plain"]))
    assert lines[0] == f"{sparse}: layers 4, 7 (and the last, 8)"
    assert lines[-1].startswith(f"{sparse} / plain full-depth generation:")


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
