"""`eetb demo` end to end on a small configuration: every stage leaves its files and the report."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from testbed.demo import DemoConfig, choose_dataset, run_demo
from testbed.trace import read_capture

SMALL = DemoConfig(
    workload="poisson:rate=30,n=6,prompt=16-48,output=8",
    higher_load="poisson:rate=60,n=6,prompt=16-48,output=8",
    calibration_workload="poisson:rate=30,n=6,prompt=16-48,output=8",
    thresholds=(0.95, 0.99),
    min_agreement=0.0,
    top_k=2,
    workers=1,
    repeats=1,
    spread=1,
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    empty = tmp_path_factory.mktemp("no-data")  # no data set: the model writes its own prompts
    return run_demo(SMALL, out, data_dir=str(empty)), out


def oracle_blocks(meta) -> int:
    """The blocks the engine that wrote ``meta`` had: its K/V memory over a block's bytes."""
    cfg = meta["model"]["config"]
    per_block = 2 * cfg["num_hidden_layers"] * meta["block_size"] * cfg["num_key_value_heads"]
    per_block *= cfg["hidden_size"] // cfg["num_attention_heads"] * 4  # float32
    return int(meta["kv_cache_mb"] * 2**20 // per_block)


def test_demo_runs_every_stage(demo):
    report, out = demo
    assert json.loads((out / "run.json").read_text())["dataset"] == "self"
    oracle = read_capture(out / "validate" / "oracle")
    assert oracle.meta["mode"] == "oracle" and oracle.requests.num_rows == 6
    rows = pq.read_table(out / "sweep" / "results.parquet").to_pylist()
    # the sweep ranks the engine the validation runs: its K/V capacity, not the simulator's default
    grid = json.loads((out / "sweep" / "run.json").read_text())["config"]
    assert grid["num_kv_blocks"] == oracle_blocks(oracle.meta) != 4096
    # 4 batching policies × 2 rules × 2 thresholds, plus full, at each of two loads
    assert len(rows) == 2 * (4 * 2 * 2 + 1) >= 2 * 12
    summary = json.loads((out / "validate" / "validation.json").read_text())
    labels = [c["label"] for c in summary["configurations"]]
    selection = json.loads((out / "selection.json").read_text())
    assert labels[0] == "full" and len(labels) == 1 + SMALL.top_k + SMALL.spread
    assert len(selection["policies"]) == SMALL.top_k + SMALL.spread
    text = report.read_text()
    assert "## Simulated against measured" in text and "## Sweep" in text
    assert (out / "figures" / "sim_vs_measured.png").is_file()


def test_demo_rerun_resumes(demo, monkeypatch):
    report, out = demo
    import testbed.validate

    def refuse(*args, **kwargs):
        raise AssertionError("a finished engine run was redone")

    monkeypatch.setattr(testbed.validate.EngineRuns, "capture", refuse)
    assert run_demo(SMALL, out, data_dir=str(out / "none")) == report


def test_choose_dataset(tmp_path, monkeypatch):
    monkeypatch.delenv("EETB_DATA_DIR", raising=False)
    assert choose_dataset(str(tmp_path)) == "self"


def test_cli_refuses_a_used_folder_without_resume(tmp_path, capsys):
    from testbed.cli import main as cli

    (tmp_path / "old.txt").write_text("keep me")
    assert cli(["demo", "--out", str(tmp_path)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (tmp_path / "old.txt").read_text() == "keep me"


def test_a_known_model_brings_its_own_grid_unless_flags_give_one():
    from testbed.demo import demo_config

    assert demo_config().thresholds == DemoConfig.thresholds
    real = demo_config("smollm2-135m")
    assert (real.thresholds, real.min_exit_layer) == ((0.8, 0.9, 0.95), 15)
    asked = demo_config("smollm2-135m", thresholds=(0.7,), min_exit_layer=None, repeats=2)
    assert (asked.thresholds, asked.min_exit_layer, asked.repeats) == ((0.7,), 15, 2)
