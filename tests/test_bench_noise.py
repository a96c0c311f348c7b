"""The noise bench: interleaved rounds of `full` per variant, and their spread."""

from __future__ import annotations

import json

import pytest
import torch

from testbed.bench.noise import Spread, Variant, run
from testbed.bench.options import BenchOptions
from testbed.cli import main as cli

WORKLOAD = "poisson:rate=40,n=4,prompt=16-32,output=6"


def test_spread_is_the_relative_mad_and_range():
    s = Spread.of([90.0, 100.0, 100.0, 110.0, 130.0])
    assert s.median == 100.0
    assert s.mad == pytest.approx(0.10)  # |deviations| 10, 0, 0, 10, 30: median 10
    assert s.range == pytest.approx(0.40)


def test_rounds_interleave_the_variants_and_measure_cpu_time(tmp_path):
    threads = torch.get_num_threads()
    opts = BenchOptions(out=tmp_path, dataset="synthetic", workload=WORKLOAD, rounds=2)
    lines: list[str] = []
    variants = (Variant("plain"), Variant("1 thread", threads=1), Variant("warm", warm_up=True))
    spreads = run(opts, lines.append, variants=variants)
    assert torch.get_num_threads() == threads  # the 1-thread variant restored it
    runs = json.loads((tmp_path / "noise.json").read_text())
    # round-robin: every variant once per round, in order
    assert [(r["round"], r["variant"]) for r in runs] == [
        (k, v.name) for k in range(2) for v in variants
    ]
    assert all(r["throughput_tokens_per_s"] > 0 and r["cpu_s_per_token"] > 0 for r in runs)
    for name, row in spreads.items():
        mine = [r["throughput_tokens_per_s"] for r in runs if r["variant"] == name]
        assert row["throughput"].range == pytest.approx(
            (max(mine) - min(mine)) / row["throughput"].median
        )
        assert "cpu_per_token" in row
    # the warm-up's scratch capture is removed; the timed runs stay
    names = {p.name for p in (tmp_path / "runs").iterdir()}
    assert len(names) == len(runs) and not any(n.endswith(".warm") for n in names)
    assert json.loads((tmp_path / "run.json").read_text())["config"]["rounds"] == 2
    assert any(line.startswith("warm ") for line in lines)


def test_one_round_is_refused(tmp_path, capsys):
    code = cli(["bench", "--suite", "noise", "--rounds", "1", "--out", str(tmp_path)])
    assert code == 2
    assert "--rounds must be at least 2" in capsys.readouterr().err
