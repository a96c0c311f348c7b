"""`eetb validate`: A/B runs on the native engine against the simulator, on the built-in model."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from policies.errors import PolicyConfigError
from testbed.cli import main as cli
from testbed.core.policy_set import PolicyConfig
from testbed.cost_spec import CostModelSpec
from testbed.errors import ConfigError
from testbed.sim.cost_model import build_cost_model, price_capture_s
from testbed.sim.simulator import DEFAULT_NUM_KV_BLOCKS, SimulationConfig
from testbed.sweep import config_columns
from testbed.sweep.results import policy_of
from testbed.trace import read_capture
from testbed.validate import (
    BASELINE,
    EngineRuns,
    ValidationConfig,
    ValidationError,
    run_validation,
    select_from_sweep,
)
from testbed.validate.measured import agreement_with, live_records
from testbed.validate.speed import fitted_at_reference, probe_time_s, speed_file, step_dilation
from testbed.validation_records import Missing, ValidationResults

WORKLOAD = "poisson:rate=20,n=6,prompt=16-64,output=10"
CALIBRATE = "poisson:rate=20,n=6,prompt=16-64,output=10"
EARLY = PolicyConfig(batching="consensus", exit_rule="hidden", threshold=0.9, min_exit_layer=4)


def _cfg(**kw) -> ValidationConfig:
    args = dict(policies=(EARLY,), workload=WORKLOAD, calibration_workload=CALIBRATE,
                dataset="synthetic", seed=3, repeats=1)  # fmt: skip
    return ValidationConfig(**{**args, **kw})


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    out = tmp_path_factory.mktemp("validate")
    return run_validation(_cfg(), out), out


def test_validation_writes_measured_and_predicted_for_full_and_each_policy(validated):
    result, out = validated
    # the file reads back as the very records the run returned
    assert ValidationResults.read(out / "validation.json") == result.results
    labels = [c.label for c in result.results.configurations]
    assert labels == ["full", EARLY.label()]
    full, early = result.results.configurations
    # full computes every layer in both worlds and agrees with itself
    assert full.mean_exit_layer_measured == full.mean_exit_layer_predicted == 8
    assert full.agreement_measured == 1.0 and full.exit_hist_tv == 0
    assert full.speedup_measured == 1.0
    # the early-exit run really exited early, as the replay of the oracle trace predicts
    assert early.mean_exit_layer_measured < 8 and early.mean_exit_layer_predicted < 8
    assert sum(early.exit_hist_measured) == pytest.approx(1.0)
    assert 0 <= early.exit_hist_tv <= 1
    assert 0 <= early.agreement_measured <= 1
    # every measured number comes from the live capture of that configuration
    live = read_capture(out / "live" / "01" / "r0")
    assert live.meta["mode"] == "live" and live.meta["policy"]["batching"] == "consensus"
    records = live_records(live)
    layers = [x for r in records for x in r.exit_layers]
    assert early.measured["mean_exit_layer"] == pytest.approx(sum(layers) / len(layers))
    assert early.measured["num_output_tokens"] == live.tokens.num_rows


def test_validation_error_table_and_tau(validated):
    result, out = validated
    s = result.results
    rows = pq.read_table(out / "validation.parquet").to_pylist()
    assert {r["policy"] for r in rows} == {"full", EARLY.label()}
    for r in rows:
        if r["error"] is not None:
            assert r["error"] == pytest.approx(r["predicted"] / r["measured"] - 1, rel=1e-9)
    assert s.forecast.kendall_tau_throughput in (-1.0, 1.0)  # two items: concordant or not
    assert s.cost_model.startswith("fitted:") and "calibration" in s.cost_model
    assert s.fit.num_steps > 0 and s.missing == ()
    lat = pq.read_table(out / "latencies.parquet").to_pylist()
    assert len(lat) == 2 * 2 * 6  # configurations × (measured, simulated) × requests


def test_calibration_is_a_separate_request_stream(validated):
    _, out = validated
    calib = read_capture(out / "calibration" / "full" / "r0")
    oracle = read_capture(out / "oracle")
    assert calib.meta["mode"] == "live" and oracle.meta["mode"] == "oracle"
    # another seed: the same workload shape, other arrivals and prompts
    assert calib.requests["arrival_s"].to_pylist() != oracle.requests["arrival_s"].to_pylist()


def test_rerun_reuses_finished_configurations(validated, monkeypatch):
    _, out = validated

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was redone")

    monkeypatch.setattr(EngineRuns, "capture", refuse)
    again = run_validation(_cfg(), out)
    assert [c.label for c in again.results.configurations] == ["full", EARLY.label()]


def test_a_folder_of_another_configuration_list_is_refused_before_any_run(validated, monkeypatch):
    _, out = validated

    def refuse(*args, **kwargs):
        raise AssertionError("ran although the folder holds another list's runs")

    monkeypatch.setattr(EngineRuns, "capture", refuse)
    before = (out / "run.json").read_text()
    other = PolicyConfig(batching="shrink", exit_rule="hidden", threshold=0.8, min_exit_layer=4)
    with pytest.raises(ValidationError, match="another policy than shrink"):
        run_validation(_cfg(policies=(other,)), out)
    assert (out / "run.json").read_text() == before  # nothing of the first run is lost
    assert (out / "live" / "01" / "r0" / "meta.json").is_file()


def test_a_configuration_the_engine_cannot_run_is_recorded_and_the_rest_kept(tmp_path, monkeypatch):
    bad = PolicyConfig(batching="shrink", exit_rule="hidden", threshold=0.9, min_exit_layer=4)
    original = EngineRuns.capture

    def capture(self, policy, mode, out, requests=None):
        if policy == bad and mode == "live" and "live" in str(out):
            raise ConfigError("this engine cannot run shrink")
        return original(self, policy, mode, out, requests)

    monkeypatch.setattr(EngineRuns, "capture", capture)
    result = run_validation(_cfg(policies=(bad, EARLY)), tmp_path)
    s = result.results
    assert [c.label for c in s.configurations] == ["full", EARLY.label()]
    assert s.missing == (Missing(bad.label(), "ConfigError: this engine cannot run shrink"),)
    assert (tmp_path / "configs" / "01.error.json").is_file()
    assert (tmp_path / "configs" / "02.json").is_file()


def test_bad_configurations_fail_before_any_run(tmp_path):
    with pytest.raises(ValidationError, match="no configuration"):
        _cfg(policies=())
    with pytest.raises(ValidationError, match="calibration"):
        _cfg(calibration_workload="")
    with pytest.raises(ValidationError, match="unknown engine"):
        _cfg(engine="tensorrt")
    with pytest.raises(PolicyConfigError):
        _cfg(policies=(PolicyConfig(batching="nonesuch"),))
    with pytest.raises(ValidationError, match="not a capture directory"):
        run_validation(
            _cfg(calibration=str(tmp_path / "missing"), calibration_workload=""), tmp_path / "o"
        )


def test_agreement_with_full_is_token_weighted():
    full = {0: [1, 2, 3, 4], 1: [5, 6]}
    assert agreement_with(full, full) == 1.0
    assert agreement_with({0: [1, 2, 9, 9], 1: [5, 6]}, full) == pytest.approx(4 / 6)
    assert agreement_with({0: [1, 2], 1: [5, 6]}, full) == pytest.approx(4 / 6)  # shorter output


# --- choosing from a sweep ----------------------------------------------------------------------

POLICIES = [
    BASELINE,
    PolicyConfig(
        batching="quorum",
        batching_params=(("fraction", 0.75),),
        threshold=0.95,
        min_exit_layer=4,
        decay_tau=2.0,
    ),  # fmt: skip
    PolicyConfig(batching="shrink", exit_rule="classifier", threshold=0.7, kv_fill="skip"),
    PolicyConfig(batching="consensus", threshold=0.9, exit_stride=2),
]


def _fake_sweep(path, throughputs, agreements):
    rows = []
    for policy, tput, agree in zip(POLICIES, throughputs, agreements, strict=True):
        cfg = SimulationConfig(trace="t", workload="poisson:rate=1,n=2", policy=policy)
        rows.append(
            {**config_columns(cfg), "throughput_tokens_per_s": tput, "est_agreement": agree}
        )
    path.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), path / "results.parquet")
    (path / "run.json").write_text(json.dumps({"min_agreement": 0.8}))
    return path


def test_policy_of_inverts_the_sweep_columns():
    for policy in POLICIES:
        row = config_columns(SimulationConfig(trace="t", workload="w", policy=policy))
        assert policy_of(row) == policy


def test_select_from_sweep_takes_the_best_runs_meeting_the_constraint(tmp_path):
    sweep = _fake_sweep(tmp_path / "s", [100, 130, 150, 120], [1.0, 0.9, 0.5, 0.85])
    sel = select_from_sweep(sweep, 2)
    # shrink is fastest but misses min_agreement 0.8; full is never a candidate
    assert sel.policies == (POLICIES[1], POLICIES[3])
    assert (sel.trace, sel.workload) == ("t", "poisson:rate=1,n=2")


def test_select_from_sweep_spread_reaches_down_to_the_slowest(tmp_path):
    sweep = _fake_sweep(tmp_path / "s", [100, 130, 150, 120], [1.0, 0.9, 0.5, 0.85])
    # after the top 1 (quorum), the rest best first: shrink (150, fails the constraint), consensus
    assert select_from_sweep(sweep, 1, spread=1).policies == (POLICIES[1], POLICIES[3])
    assert select_from_sweep(sweep, 1, spread=2).policies == (POLICIES[1], POLICIES[2], POLICIES[3])
    assert select_from_sweep(sweep, 2, spread=5).policies == (POLICIES[1], POLICIES[3], POLICIES[2])
    with pytest.raises(ValidationError, match="--spread"):
        select_from_sweep(sweep, 1, spread=-1)


def test_select_from_sweep_min_gap_passes_over_near_ties(tmp_path):
    # full 100; a near-tie of the best (129) and one of full (101) are passed over
    policies = [BASELINE] + [PolicyConfig(batching="shrink", threshold=t)
                             for t in (0.91, 0.92, 0.93, 0.94, 0.95)]  # fmt: skip
    throughputs = [100, 130, 129, 101, 120, 110]
    rows = [
        {**config_columns(SimulationConfig(trace="t", workload="w", policy=p)),
         "throughput_tokens_per_s": float(t), "est_agreement": 1.0}
        for p, t in zip(policies, throughputs, strict=True)
    ]  # fmt: skip
    sweep = tmp_path / "s"
    sweep.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), sweep / "results.parquet")
    a, b, c, d, e = policies[1:]
    assert select_from_sweep(sweep, 2).policies == (a, b)
    assert select_from_sweep(sweep, 2, min_gap=0.03).policies == (a, d)
    # the spread, too, takes a run apart from full and the chosen (110) before a tie
    assert select_from_sweep(sweep, 2, spread=1, min_gap=0.03).policies == (a, d, e)
    # more slots than distinct runs: the passed-over fill them, best first
    assert select_from_sweep(sweep, 4, min_gap=0.03).policies == (a, b, d, e)
    assert select_from_sweep(sweep, 3, spread=2, min_gap=0.03).policies == (a, d, e, b, c)
    with pytest.raises(ValidationError, match="--min-gap"):
        select_from_sweep(sweep, 1, min_gap=1.5)


def test_select_from_sweep_bad_input(tmp_path):
    with pytest.raises(ValidationError, match="no results.parquet"):
        select_from_sweep(tmp_path, 3)
    sweep = _fake_sweep(tmp_path / "s", [100, 130, 150, 120], [1.0, 0.1, 0.1, 0.1])
    with pytest.raises(ValidationError, match="ranking is empty"):
        select_from_sweep(sweep, 3)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "results.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValidationError, match="unreadable"):
        select_from_sweep(tmp_path / "c", 3)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert cli(["validate", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no results.parquet" in err[0]
    assert cli(["validate", "--calibrate", CALIBRATE, "--out", str(tmp_path / "o")]) == 2
    assert "--workload is needed" in capsys.readouterr().err
    assert cli(["validate", "--workload", WORKLOAD, "--out", str(tmp_path / "o")]) == 2
    assert "calibration" in capsys.readouterr().err


def test_repeated_rounds_report_the_median_and_the_spread(tmp_path):
    cfg = _cfg(repeats=2, workload="poisson:rate=40,n=3,prompt=16-32,output=6",
               calibration_workload="poisson:rate=40,n=3,prompt=16-32,output=6")  # fmt: skip
    s = run_validation(cfg, tmp_path).results
    assert s.repeats == 2
    for c in s.configurations:
        runs = c.throughput_runs
        assert len(runs) == 2 and len(c.tpot_mean_runs_s) == 2
        assert c.measured["throughput_tokens_per_s"] == pytest.approx(sum(runs) / 2)
        # each round's CPU share of its steps' wall time: measured, and no more than the
        # engine's threads could use
        assert len(c.cpu_share_runs) == 2
        assert all(0 < x <= torch.get_num_threads() + 0.1 for x in c.cpu_share_runs)
    # both rounds ran: a live and a calibration capture per configuration and round
    for k in (0, 1):
        assert (tmp_path / "live" / "00" / f"r{k}" / "meta.json").is_file()
        assert (tmp_path / "calibration" / "full" / f"r{k}" / "meta.json").is_file()
    assert s.cost_model.count("+") == 2 * 2 - 1  # four calibration captures in the fit
    # the noise floor of each configuration's two rounds, beside its forecast
    assert len(s.noise) == 2 * len(s.configurations)
    for row, c in zip(s.noise[::2], s.configurations, strict=True):
        runs = c.throughput_runs
        assert (row.low, row.high) == (min(runs), max(runs))
        assert row.forecast_inside == (min(runs) <= row.predicted <= max(runs))
    # two rounds order no pair (three at least are needed): every pair is listed as unordered
    assert len(s.unordered_pairs) == s.num_pairs


def test_each_run_is_predicted_at_the_speed_its_probes_measured(tmp_path, monkeypatch):
    """Calibration probes take 1 s and the measured runs' 2 s: the fit is normalised to the
    calibration's median, and the probed prediction runs twice as slow as the reference one."""
    cfg = _cfg(workload="poisson:rate=40,n=3,prompt=16-32,output=6",
               calibration_workload="poisson:rate=40,n=3,prompt=16-32,output=6")  # fmt: skip
    slow = {"measured": False}
    original = EngineRuns.timed_capture

    def timed_capture(self, policy, mode, out, requests=None):
        slow["measured"] = "live" in out.parts and "calibration" not in out.parts
        return original(self, policy, mode, out, requests)

    monkeypatch.setattr(EngineRuns, "timed_capture", timed_capture)
    monkeypatch.setattr(EngineRuns, "probe_s", lambda self: 2.0 if slow["measured"] else 1.0)
    s = run_validation(cfg, tmp_path).results
    assert s.reference_probe_s == 1.0
    # every calibration run at the reference speed: each capture's time factor is 1
    assert {x.time_factor for x in CostModelSpec.parse(s.cost_model).sources} == {1.0}
    for c in s.configurations:
        assert c.dilation_runs == (2.0,)
        assert (tmp_path / "live" / f"{c.index:02d}" / "r0.speed.json").is_file()
        slow_tpot = c.predicted_probed["tpot_mean_s"]
        # twice the step times; arrivals batch a little differently at that speed
        assert 1.7 < slow_tpot / c.predicted["tpot_mean_s"] < 2.3
    assert s.probed.max_goal_error is not None and s.probed.errors


def test_each_run_is_also_predicted_in_hindsight_at_the_speed_its_steps_ran(validated):
    """The step dilation is the run's own steps' seconds over the fit's price of them; the
    hindsight prediction simulates the run with step times scaled by it."""
    result, out = validated
    s = result.results
    fit = build_cost_model(s.cost_model)
    for c in s.configurations:
        priced_s, measured_s = price_capture_s(fit, out / "live" / f"{c.index:02d}" / "r0")
        (factor,) = c.step_dilation_runs
        assert factor == pytest.approx(measured_s / priced_s)
        # step times x factor; arrivals batch a little differently at that speed
        ratio = c.predicted_hindsight["tpot_mean_s"] / c.predicted["tpot_mean_s"]
        assert ratio == pytest.approx(factor, rel=0.3)
    assert s.hindsight.errors and s.hindsight.max_goal_error is not None
    assert (
        step_dilation(out / "live" / "00" / "r0", build_cost_model("roofline:H100:llama-2-7b"))
        is None
    )


def test_a_spike_in_one_probe_does_not_rescale_its_run(tmp_path):
    """A run's speed is the median of its probes: a momentary 2x spike in one leaves its factor
    at 1, where the mean would scale its durations by 0.86 (and, of one probe a side, by 0.67)."""
    dirs = []
    for name, before_s, after_s in (
        ("a", [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]),
        ("b", [2.0, 1.0, 1.0], [1.0, 1.0, 1.0]),
        ("c", [1.0, 1.02, 1.0], [0.99, 1.0, 1.01]),
    ):
        run = tmp_path / name
        run.mkdir()
        speed_file(run).write_text(json.dumps({"before_s": before_s, "after_s": after_s}))
        dirs.append(str(run))
    assert probe_time_s(tmp_path / "b") == 1.0
    calibration = fitted_at_reference(dirs)
    assert calibration.reference_probe_s == 1.0
    factors = [x.time_factor for x in CostModelSpec.parse(calibration.cost_model).sources]
    assert factors == pytest.approx([1.0, 1.0, 1.0], abs=5e-6)


def test_a_run_probed_once_a_side_reads_as_before(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    speed_file(run).write_text(json.dumps({"before_s": 1.0, "after_s": 1.2}))
    assert probe_time_s(run) == pytest.approx(1.1)


def test_each_run_is_timed_by_three_probes_a_side(validated):
    _, out = validated
    doc = json.loads((out / "live" / "01" / "r0.speed.json").read_text())
    assert len(doc["before_s"]) == len(doc["after_s"]) == 3
    assert probe_time_s(out / "live" / "01" / "r0") == pytest.approx(
        float(np.median(doc["before_s"] + doc["after_s"]))
    )


def test_a_run_without_its_probe_record_is_run_again(validated, monkeypatch):
    _, out = validated
    (out / "live" / "00" / "r0.speed.json").unlink()
    ran = []
    original = EngineRuns.capture

    def capture(self, policy, mode, path, requests=None):
        ran.append(path)
        return original(self, policy, mode, path, requests)

    monkeypatch.setattr(EngineRuns, "capture", capture)
    run_validation(_cfg(), out)
    assert ran == [out / "live" / "00" / "r0"]
    assert (out / "live" / "00" / "r0.speed.json").is_file()


def test_the_validation_simulates_the_engine_s_own_kv_capacity(monkeypatch):
    # with the simulator's default 4096 blocks, SmolLM2's 16 long Azure prompts all ran at once
    # where the engine's 256 MB hold 364 blocks: the simulated mean TPOT was twice the engine's
    from testbed.engine.engine import LLMEngine
    from testbed.validate import compare_one

    engine = EngineRuns(_cfg())
    blocks = LLMEngine(engine.ckpt).block_manager
    assert engine.kv_blocks == {"num_kv_blocks": blocks.num_blocks, "block_size": blocks.block_size}
    assert blocks.num_blocks != DEFAULT_NUM_KV_BLOCKS  # else the test proves nothing
    seen = []
    monkeypatch.setattr(compare_one, "simulate", lambda c: seen.append(c))
    compare_one._simulate_at(engine, BASELINE, "traces/samples/oracle_cnndm", "roofline:H100", 1.0)
    assert (seen[0].num_kv_blocks, seen[0].block_size) == (blocks.num_blocks, blocks.block_size)
    assert EngineRuns(_cfg(engine="vllm")).kv_blocks == {}  # vLLM's cache is vLLM's own
