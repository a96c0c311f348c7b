"""Sweeps: grid files, expansion, resuming, failures, results.parquet, ranking, the Dask path and
the CLI. The simulator is replaced by the deterministic fakes of tests/sweep_fakes.py."""

from __future__ import annotations

import dataclasses
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import testbed.commands.sweep as sweep_command
from testbed.errors import ConfigError
from testbed.sim.metrics import Metrics
from testbed.sim.simulator import simulate
from testbed.sweep import (
    BASELINE_POLICY,
    GridError,
    load_grid,
    open_executor,
    parse_grid,
    rank_runs,
    run_key,
    run_sweep,
)
from tests.sweep_fakes import fake_run, softmax_fails

REPO = Path(__file__).resolve().parents[1]
GRID = """
trace = "{trace}"
workloads = ["poisson:rate=2,n=20,prompt=16-32,output=8", "poisson:rate=8,n=20,prompt=16-32,output=8"]
cost_models = ["roofline:H100", "roofline:A100"]
seed = 3

[[policies]]
batching = "consensus"
rules = ["hidden", "softmax"]
thresholds = [0.8, 0.95]
min_exit_layer = 2

[[policies]]
batching = "quorum"
batching_params = {{fraction = 0.75}}
rules = ["hidden"]
thresholds = [0.9]
kv_fill = "lazy"

[constraint]
min_agreement = 0.9

[scheduler]
max_num_seqs = 16
"""
NUM_POLICIES = 1 + 2 * 2 + 1  # the baseline, consensus × 2 rules × 2 λ, quorum
NUM_RUNS = 2 * 2 * NUM_POLICIES


def _grid_file(tmp_path: Path, text: str = GRID) -> Path:
    path = tmp_path / "grid.toml"
    path.write_text(text.format(trace=tmp_path.as_posix()))
    return path


@pytest.fixture
def configs(tmp_path):
    return load_grid(_grid_file(tmp_path)).expand()


def test_grid_file_is_read(tmp_path):
    grid = load_grid(_grid_file(tmp_path))
    assert grid.trace == tmp_path.as_posix() and grid.seed == 3
    assert grid.min_agreement == 0.9 and grid.scheduler.max_num_seqs == 16
    assert len(grid.workloads) == 2 and grid.cost_models == ("roofline:H100", "roofline:A100")
    consensus, quorum = grid.policies
    assert consensus.thresholds == (0.8, 0.95) and consensus.min_exit_layer == 2
    assert quorum.batching_params == (("fraction", 0.75),) and quorum.kv_fill == "lazy"


def test_expansion_is_workloads_x_cost_models_x_policies_with_one_baseline(configs):
    assert len(configs) == NUM_RUNS
    assert len({run_key(c) for c in configs}) == NUM_RUNS
    for workload in {c.workload for c in configs}:
        for cost in ("roofline:H100", "roofline:A100"):
            group = [c for c in configs if c.workload == workload and c.cost_model == cost]
            assert [c.policy for c in group].count(BASELINE_POLICY) == 1
    first = configs[1].policy
    assert (first.exit_rule, first.threshold, first.min_exit_layer) == ("hidden", 0.8, 2)
    assert all(c.seed == 3 and c.scheduler.max_num_seqs == 16 for c in configs)


def test_a_full_entry_adds_no_duplicate_baseline(tmp_path):
    text = GRID + '\n[[policies]]\nbatching = "full"\nrules = ["softmax"]\nthresholds = [0.5]\n'
    assert len(load_grid(_grid_file(tmp_path, text)).expand()) == NUM_RUNS


def test_run_key_is_stable_and_sixteen_hex(configs):
    key = run_key(configs[0])
    assert len(key) == 16 and int(key, 16) >= 0
    assert run_key(dataclasses.replace(configs[0])) == key
    assert run_key(dataclasses.replace(configs[0], seed=4)) != key


@pytest.mark.parametrize(
    "edit, match",
    [
        (("seed = 3", "seed = 3\nsead = 4"), r"unknown key 'sead' \(allowed: trace, workloads,"),
        (("kv_fill =", "kv_fil ="), r"unknown key 'kv_fil' in policies\[1\] \(allowed: batching,"),
        (
            ("max_num_seqs", "max_seqs"),
            r"unknown key 'max_seqs' in scheduler \(allowed: max_num_seqs,",
        ),
        (("min_agreement", "min_rouge"), r"unknown key 'min_rouge' in constraint"),
        (
            ("[0.8, 0.95]", '[0.8, "0.95"]'),
            r"policies\[0\]\.thresholds\[1\] must be a number, got str",
        ),
        (("seed = 3", "seed = 3.5"), r"seed must be an integer, got float"),
        (("seed = 3", "seed = true"), r"seed must be an integer, got bool"),
        (
            ("min_exit_layer = 2", "min_exit_layer = 2.0"),
            r"policies\[0\]\.min_exit_layer must be an integer",
        ),
        (('rules = ["hidden"]', "rules = []"), r"policies\[1\]\.rules is an empty list"),
        (("thresholds = [0.9]", "thresholds = 0.9"), r"policies\[1\]\.thresholds must be a list"),
        (('"roofline:H100", "roofline:A100"', ""), r"cost_models is an empty list"),
        (('trace = "{trace}"', ""), r"missing key trace"),
        (('batching = "quorum"', 'batching = "quorom"'), r"policies\[1\]: .*quorom"),
        (('"hidden", "softmax"', '"hidden", "sofmax"'), r"policies\[0\]: .*sofmax"),
        (("rate=8", "rate=-8"), r"workloads\[1\]: .*rate"),
        (("max_num_seqs = 16", "max_num_seqs = 0"), r"scheduler: max_num_seqs must be > 0"),
        (("[scheduler]", "[scheduler"), r"not valid TOML"),
        (
            ("fraction = 0.75", "fraction = [0.75]"),
            r"batching_params\.fraction must be a number, string",
        ),
        (("seed = 3", "seed = -1"), r"seed must be >= 0"),
        (("min_agreement = 0.9", "min_agreement = 90"), r"min_agreement must be in \[0, 1\]"),
        (("seed = 3", "seed = 3\nnum_kv_blocks = 0"), r"num_kv_blocks must be > 0"),
    ],
)
def test_bad_grids_name_the_problem(tmp_path, edit, match):
    old, new = edit
    assert old in GRID
    with pytest.raises(GridError, match=match) as info:
        load_grid(_grid_file(tmp_path, GRID.replace(old, new)))
    assert str(info.value).startswith(str(tmp_path / "grid.toml"))


def test_missing_grid_file(tmp_path):
    with pytest.raises(GridError, match="cannot read grid"):
        load_grid(tmp_path / "nope.toml")


def test_an_unreachable_dask_scheduler_is_a_config_error():
    pytest.importorskip("distributed")
    with (
        pytest.raises(ConfigError, match="--dask bogus://x: unknown address scheme"),
        open_executor("bogus://x", 1),
    ):
        pass


def test_policies_must_be_tables():
    doc = {"trace": "t", "workloads": ["poisson:rate=1,n=2"], "cost_models": ["c"], "policies": [1]}
    with pytest.raises(GridError, match=r"policies\[0\] must be a table, got int"):
        parse_grid(doc, "g.toml")


class _Counting:
    """A run function that counts its calls (threads only: it is not picklable by name)."""

    def __init__(self, fn=fake_run):
        self.fn, self.calls, self._lock = fn, 0, threading.Lock()

    def __call__(self, cfg):
        with self._lock:
            self.calls += 1
        return self.fn(cfg)


def _sweep(configs, out, run_fn=fake_run, **kwargs):
    with ThreadPoolExecutor(max_workers=2) as pool:
        return run_sweep(configs, out, executor=pool, run_fn=run_fn, **kwargs)


def test_each_run_is_written_and_a_rerun_skips_finished_ones(configs, tmp_path):
    out = tmp_path / "out"
    first = _sweep(configs[:5], out)  # an interrupted sweep that finished five runs
    assert (first.num_runs, first.num_finished, first.num_skipped) == (5, 5, 0)
    assert sorted(p.stem for p in (out / "runs").glob("*.json")) == sorted(
        run_key(c) for c in configs[:5]
    )
    counting, progress = _Counting(), []
    again = _sweep(configs, out, counting, progress=lambda *a: progress.append(a))
    assert counting.calls == NUM_RUNS - 5
    assert (again.num_finished, again.num_skipped, again.failures) == (NUM_RUNS - 5, 5, ())
    assert len(again.rows) == NUM_RUNS
    assert progress[-1][:3] == ("sweep", NUM_RUNS - 5, NUM_RUNS - 5)
    assert _sweep(configs, out, counting).num_skipped == NUM_RUNS and counting.calls == NUM_RUNS - 5


def test_a_half_written_run_file_does_not_count_as_finished(configs, tmp_path):
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / f".{run_key(configs[0])}.json.tmp").write_text('{"metr')
    counting = _Counting()
    assert _sweep(configs[:1], out, counting).num_finished == 1 and counting.calls == 1


def test_an_interrupt_stops_the_sweep_and_keeps_finished_runs(configs, tmp_path):
    out = tmp_path / "out"

    def interrupted(cfg):
        if cfg is configs[3]:
            raise KeyboardInterrupt
        return fake_run(cfg)

    with pytest.raises(KeyboardInterrupt), ThreadPoolExecutor(max_workers=1) as pool:
        run_sweep(configs, out, executor=pool, run_fn=interrupted)
    num_kept = len(list((out / "runs").glob("*.json")))
    assert not list((out / "runs").glob("*.error.json"))
    again = _sweep(configs, out)
    assert again.num_skipped == num_kept and again.num_finished == NUM_RUNS - num_kept


def test_a_failing_run_is_recorded_and_the_others_kept(configs, tmp_path):
    out = tmp_path / "out"
    report = _sweep(configs, out, softmax_fails)
    num_softmax = 2 * 2 * 2  # workloads × cost models × the two softmax thresholds
    assert len(report.failures) == num_softmax
    assert report.num_finished == len(report.rows) == NUM_RUNS - num_softmax
    failure = report.failures[0]
    assert failure.message == "SimulationError: the trace has no softmax signals"
    assert "softmax" in failure.label
    doc = json.loads((out / "runs" / f"{failure.key}.error.json").read_text())
    assert doc["message"] == failure.message and doc["config"]["policy"]["exit_rule"] == "softmax"
    assert pq.read_table(report.results_path).num_rows == NUM_RUNS - num_softmax
    counting = _Counting()  # fixed: only the failed runs run again, and their errors go
    fixed = _sweep(configs, out, counting)
    assert counting.calls == num_softmax and fixed.failures == () and len(fixed.rows) == NUM_RUNS
    assert not list((out / "runs").glob("*.error.json"))


def test_results_parquet_has_config_columns_and_every_metric(configs, tmp_path):
    report = _sweep(configs, tmp_path / "out")
    assert report.results_path == tmp_path / "out" / "results.parquet"
    table = pq.read_table(report.results_path)
    assert table.num_rows == NUM_RUNS
    config_columns = ["key", "trace", "workload", "cost_model", "policy", "is_baseline",
                      "batching", "batching_params", "rule", "threshold", "min_exit_layer",
                      "kv_fill", "seed"]  # fmt: skip
    metric_columns = [f.name for f in dataclasses.fields(Metrics)]
    assert set(config_columns + metric_columns) <= set(table.column_names)
    rows = table.to_pylist()
    quorum = next(r for r in rows if r["batching"] == "quorum")
    assert json.loads(quorum["batching_params"]) == {"fraction": 0.75}
    assert (quorum["rule"], quorum["threshold"], quorum["kv_fill"]) == ("hidden", 0.9, "lazy")
    baseline = next(r for r in rows if r["is_baseline"])
    assert baseline["rule"] is None and baseline["policy"] == "full"
    assert [r["key"] for r in rows] == [run_key(c) for c in configs]


def test_ranking_keeps_runs_meeting_the_constraint_with_speedup_over_full(configs, tmp_path):
    rows = _sweep(configs, tmp_path / "out").rows
    ranked = rank_runs(rows, min_agreement=0.9)
    # the fake agrees on a fraction λ of tokens, so λ = 0.8 runs fall out
    assert {r["threshold"] for r in ranked} == {None, 0.9, 0.95}
    assert all(r["est_agreement"] >= 0.9 for r in ranked)
    first = ranked[0]  # quorum at λ 0.9 runs 1.1× as fast as full
    assert (first["batching"], first["speedup"]) == ("quorum", pytest.approx(1.1))
    groups = [(r["workload"], r["cost_model"]) for r in ranked]
    assert groups == sorted(groups, key=groups.index)  # each group contiguous, in grid order
    for group in set(groups):
        speeds = [
            r["throughput_tokens_per_s"]
            for r in ranked
            if (r["workload"], r["cost_model"]) == group
        ]
        assert speeds == sorted(speeds, reverse=True)
    assert len(rank_runs(rows, None)) == NUM_RUNS


def test_ranking_without_a_finished_baseline_has_no_speedup(configs, tmp_path):
    rows = [r for r in _sweep(configs, tmp_path / "out").rows if not r["is_baseline"]]
    assert {r["speedup"] for r in rank_runs(rows, 0.9)} == {None}


def test_dask_local_cluster_gives_the_same_results_as_the_process_pool(
    configs, tmp_path, monkeypatch
):
    # workers unpickle tests.sweep_fakes.fake_run by name, so they need the repository on their path
    pytest.importorskip("distributed")  # the `dev` extra installs it, so CI runs this
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.chdir(REPO)
    subset = configs[:6]  # one workload × cost model: the baseline, 4 consensus, 1 quorum
    with open_executor(None, 2) as pool:
        local = run_sweep(subset, tmp_path / "pool", executor=pool, run_fn=softmax_fails)
    with open_executor("local", 2) as dask:
        remote = run_sweep(subset, tmp_path / "dask", executor=dask, run_fn=softmax_fails)
    assert remote.rows == local.rows and len(remote.rows) == 4
    assert set(remote.failures) == set(local.failures) and len(remote.failures) == 2


# --- the CLI -------------------------------------------------------------------------------------


def test_cli_sweeps_ranks_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep_command, "simulate", fake_run)
    out = tmp_path / "out"
    argv = [str(_grid_file(tmp_path)), "--out", str(out), "--workers", "2"]
    assert sweep_command.main(argv) == 0
    printed = capsys.readouterr().out
    assert (
        printed.startswith("# Sweep ranking")
        and f"{NUM_RUNS} runs: {NUM_RUNS} finished now" in printed
    )
    assert (out / "ranking.md").read_text() in printed
    assert "| 1 | quorum(fraction=0.75)/hidden@0.9/lazy | " in printed and "| 1.10 |" in printed
    info = json.loads((out / "run.json").read_text())
    assert info["seed"] == 3 and info["num_runs"] == NUM_RUNS and "git_commit" in info
    assert pq.read_table(out / "results.parquet").num_rows == NUM_RUNS
    assert sweep_command.main([*argv, "--min-agreement", "0.99"]) == 0
    printed = capsys.readouterr().out
    assert f"0 finished now, {NUM_RUNS} skipped" in printed
    assert "4 of 24 finished runs meet the constraint" in printed  # only the baselines


def test_cli_reports_failed_runs_and_keeps_the_rest(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep_command, "simulate", softmax_fails)
    out = tmp_path / "out"
    assert sweep_command.main([str(_grid_file(tmp_path)), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "8 failed" in captured.out
    assert captured.err.count("the trace has no softmax signals") == 8
    assert pq.read_table(out / "results.parquet").num_rows == NUM_RUNS - 8


@pytest.mark.parametrize(
    "grid_text, match",
    [
        (GRID.replace("seed = 3", "seed = 3\nworkload = 1"), "unknown key 'workload'"),
        (GRID.replace('trace = "{trace}"', 'trace = "{trace}/missing"'), "is not a directory"),
    ],
)
def test_cli_bad_grid_is_one_line_and_exit_2(tmp_path, capsys, grid_text, match):
    out = tmp_path / "out"
    assert sweep_command.main([str(_grid_file(tmp_path, grid_text)), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eetb: error: ") and err.count("\n") == 1 and match in err
    assert not out.exists()


def _consensus_grid(tmp_path, sample: str, workload: str, cost_model: str):
    """The configs of a real grid: full and consensus/hidden@0.9 on a sample trace."""
    (tmp_path / "grid.toml").write_text(f"""
trace = "traces/samples/{sample}"
workloads = ["{workload}"]
cost_models = ["{cost_model}"]
[[policies]]
batching = "consensus"
rules = ["hidden"]
thresholds = [0.9]
""")
    return load_grid(tmp_path / "grid.toml").expand()


def test_a_small_real_sweep_on_the_sample_trace(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    configs = _consensus_grid(tmp_path, "oracle_cnndm", "poisson:rate=4,n=6,prompt=64-128,output=16",
                              "roofline:H100")  # fmt: skip
    report = _sweep(configs, tmp_path / "out", simulate)
    assert report.failures == () and len(report.rows) == 2
    full, consensus = report.rows
    assert full["is_baseline"] and full["est_agreement"] == 1.0
    assert consensus["mean_exit_layer"] <= full["mean_exit_layer"]
    assert full["num_requests"] == consensus["num_requests"] == 6


def test_a_fitted_sweep_records_the_engine_s_capacity_and_reruns_older_points(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(REPO)
    configs = _consensus_grid(tmp_path, "oracle_smollm2", "poisson:rate=4,n=3,prompt=16,output=4",
                              "fitted:traces/samples/oracle_smollm2")  # fmt: skip
    row = _sweep(configs, tmp_path / "out", simulate).rows[0]
    # the grid leaves the capacity open; the fit's engine held 364 blocks and ran 2048 tokens
    assert (row["num_kv_blocks"], row["max_model_len"]) == (364, 2048)
    # a point an older eetb wrote (no as_run, perhaps at 4096 blocks) is not taken as finished
    path = tmp_path / "out" / "runs" / f"{row['key']}.json"
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "schema_version": 1, "as_run": {"num_kv_blocks": 4096}}))
    report = _sweep(configs, tmp_path / "out", simulate)
    assert report.num_finished == 1 and report.rows[0]["num_kv_blocks"] == 364
