"""analysis/ and `eetb report`: figures and tables from result files alone."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from analysis.figures import offered_load
from analysis.load import ReportError, load_run
from analysis.rank import pareto_front, with_speedups
from analysis.report import _chance_inside, write_report
from testbed.cli import main as cli
from testbed.compare import error_rows
from testbed.core.policy_set import PolicyConfig
from testbed.sim.simulator import SimulationConfig
from testbed.sweep import config_columns
from testbed.validation_records import (
    VALIDATION_SCHEMA_VERSION,
    Comparison,
    ConfigResult,
    FitSummary,
    Missing,
    NoiseRow,
    ValidationResults,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _metrics(tput: float, agree: float | None, layer: float) -> dict:
    return {"throughput_tokens_per_s": tput, "est_agreement": agree, "mean_exit_layer": layer,
            "tpot_p50_s": 0.01, "ttft_p99_s": 0.1, "num_preemptions": 0}  # fmt: skip


def _sweep(path, loads=(2, 4)):
    rows = []
    for rate in loads:
        workload = f"poisson:rate={rate},n=10"
        rows.append(
            {**config_columns(SimulationConfig("t", workload)), **_metrics(100 * rate, 1.0, 8)}
        )
        for i, (batching, rule) in enumerate([("consensus", "hidden"), ("shrink", "hidden"),
                                              ("shrink", "classifier")]):  # fmt: skip
            for lam in (0.9, 0.95):
                policy = PolicyConfig(batching=batching, exit_rule=rule, threshold=lam)
                m = _metrics(100 * rate * (1.3 - lam + 0.1 * i), lam - 0.1 * i, 3 + i)
                rows.append({**config_columns(SimulationConfig("t", workload, policy)), **m})
    path.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), path / "results.parquet")
    return rows


def _validation(path, *, version=VALIDATION_SCHEMA_VERSION, missing=()):
    configs, errors, latencies = [], [], []
    for i, label in enumerate(["full", "shrink/hidden@0.9/copy"]):
        pred = {"throughput_tokens_per_s": 100.0 + 10 * i, "tpot_mean_s": 0.010, "ttft_mean_s": 0.05,
                "e2e_mean_s": 0.5, "tpot_p90_s": 0.02, "ttft_p90_s": 0.1, "e2e_p99_s": 1.0}  # fmt: skip
        real = {k: v * 1.05 for k, v in pred.items()}
        errors += error_rows(label, pred, real)
        hist = (0.0,) * 7 + (1.0,) if i == 0 else (0.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0)
        configs.append(ConfigResult(
            index=i, label=label, policy={}, speedup_measured=1 + 0.1 * i,
            speedup_predicted=1 + 0.1 * i, speedup_error=0.0, rouge_l=0.1,
            exit_hist_measured=hist, exit_hist_predicted=hist, exit_hist_tv=0.0,
            mean_exit_layer_measured=8 - 4.5 * i, mean_exit_layer_predicted=8 - 4.5 * i,
            agreement_measured=1 - 0.3 * i, agreement_predicted=1 - 0.2 * i,
            # the live early-exit run stopped at its own EOS: fewer tokens than the trace's
            predicted={**pred, "num_output_tokens": 480},
            measured={**real, "num_output_tokens": 480 - 20 * i},
        ))  # fmt: skip
        for source in ("measured", "simulated"):
            latencies += [{"policy": label, "source": source, "request_id": r, "ttft_s": 0.01 * r,
                           "tpot_s": 0.01, "e2e_s": 0.5} for r in range(5)]  # fmt: skip
    res = ValidationResults(
        engine="native", workload="poisson:rate=2,n=10", cost_model="fitted:x",
        fit=FitSummary(0.9, 10), configurations=tuple(configs),
        forecast=Comparison(tuple(errors), 1.0, 0.0476), missing=tuple(missing),
        schema_version=version,
    )  # fmt: skip
    path.mkdir(parents=True)
    _write(path, res)
    pq.write_table(pa.Table.from_pylist(latencies), path / "latencies.parquet")
    return res


def _write(path, res):
    (path / "validation.json").write_text(json.dumps(res.to_json()))


def test_report_of_a_demo_folder_has_every_table_and_figure(tmp_path):
    _sweep(tmp_path / "sweep")
    _validation(tmp_path / "validate")
    path = write_report(tmp_path)
    text = path.read_text()
    assert "## Simulated against measured" in text and "## Sweep" in text
    assert (
        "| shrink/hidden@0.9/copy | 1.100 | 1.100 | 3.50 | 3.50 | 0.000 | 80.0% | 70.0% | 480 | 460 |"
        in text
    )
    assert "| full | throughput tok/s | 100 | 105 | -4.8% |" in text
    assert "Kendall tau of the throughput order: 1.000 (meets the 0.6 goal)" in text
    assert "4.8% (meets the 10% goal)" in text
    figures = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert figures == ["exit_histograms.png", "latency_cdfs.png", "quality_vs_speedup.png",
                       "sim_vs_measured.png", "speedup_vs_lambda.png", "throughput_vs_load.png"]  # fmt: skip
    for name in figures:
        assert (tmp_path / "figures" / name).read_bytes().startswith(PNG)
        assert f"](figures/{name})" in text
    assert "## Missing" not in text


def test_report_says_what_is_missing(tmp_path):
    _sweep(tmp_path / "sweep", loads=(2,))  # one load: no load curve
    text = write_report(tmp_path).read_text()
    assert "no validation results" in text
    assert "'Throughput against offered load' left out" in text
    _validation(tmp_path / "v", missing=[Missing("rebatch/x", "ConfigError: no")])
    text = write_report(tmp_path).read_text()
    assert "validation of rebatch/x is missing: ConfigError: no" in text


def test_sweep_ranking_in_the_report_is_best_first(tmp_path):
    rows = _sweep(tmp_path / "s")
    text = write_report(tmp_path / "s").read_text()
    section = text.split("### `poisson:rate=2,n=10`")[1].split("###")[0]
    tputs = [
        float(line.split("|")[2])
        for line in section.splitlines()
        if line.startswith("| ") and "policy" not in line
    ]
    assert tputs == sorted(tputs, reverse=True)
    assert len(tputs) == sum(r["workload"] == "poisson:rate=2,n=10" for r in rows)


def test_bad_run_folders(tmp_path, capsys):
    with pytest.raises(ReportError, match="no such run folder"):
        load_run(tmp_path / "nope")
    with pytest.raises(ReportError, match="no results.parquet"):
        load_run(tmp_path)
    _validation(tmp_path / "old", version=99)
    with pytest.raises(ReportError, match="schema version 99"):
        load_run(tmp_path / "old")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.parquet").write_bytes(b"garbage")
    with pytest.raises(ReportError, match="not a readable Parquet"):
        load_run(tmp_path / "bad")
    assert cli(["report", str(tmp_path / "old")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "schema version 99" in err[0]
    assert not (tmp_path / "old" / "report.md").exists()


def test_with_speedups_divides_by_the_groups_full_run():
    rows = [
        {"trace": "t", "workload": "a", "cost_model": "c", "seed": 0, "is_baseline": True, "throughput_tokens_per_s": 50.0},
        {"trace": "t", "workload": "a", "cost_model": "c", "seed": 0, "is_baseline": False, "throughput_tokens_per_s": 60.0},
        {"trace": "t", "workload": "b", "cost_model": "c", "seed": 0, "is_baseline": False, "throughput_tokens_per_s": 60.0},
    ]  # fmt: skip
    assert [r["speedup"] for r in with_speedups(rows)] == [1.0, 1.2, None]


def test_pareto_front_small_case():
    pts = [(1.0, 0.9), (1.2, 0.8), (1.1, 0.7), (1.3, 0.5), (1.0, 0.6)]
    assert pareto_front(pts) == [(1.0, 0.9), (1.2, 0.8), (1.3, 0.5)]


@given(st.lists(st.tuples(st.floats(0, 10), st.floats(0, 1)), min_size=1, max_size=20))
def test_pareto_front_points_are_undominated_and_dominate_the_rest(points):
    front = pareto_front(points)
    for p in front:
        assert not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)
    for p in points:
        assert any(f[0] >= p[0] and f[1] >= p[1] for f in front)


def test_offered_load_from_workload_strings():
    assert offered_load("poisson:rate=2.5,n=10") == 2.5
    assert offered_load("azure:path=x.csv,scale=0.1") == 0.1
    assert offered_load("lengths:path=x.csv") is None


def _probed_validation(path):
    """A validation whose runs were probed (two rounds)."""
    res = _validation(path)
    probed = Comparison(tuple(replace(r, error=0.25) for r in res.forecast.errors), -1.0, 0.25)
    configs = tuple(replace(c, throughput_runs=(1, 2), tpot_mean_runs_s=(0.1, 0.2),
                            dilation_runs=(1.1, 0.9), step_dilation_runs=(1.0, None),
                            cpu_share_runs=(0.97, 0.48)) for c in res.configurations)  # fmt: skip
    res = replace(res, reference_probe_s=0.125, probed=probed, configurations=configs)
    _write(path, res)
    return res


def test_report_of_a_probed_validation_shows_the_probed_errors_beside(tmp_path):
    res = _probed_validation(tmp_path / "validate")
    text = write_report(tmp_path).read_text()
    assert "Median over the calibration runs: 125.0 ms." in text
    assert "| full | throughput tok/s | 100 | 105 | -4.8% | +25.0% |" in text
    assert "each run at its probed speed: 25.0% and tau -1.000" in text
    assert "pairs whose order" not in text  # none resolved in the summary: no such line
    _write(tmp_path / "validate",
           replace(res, num_pairs_resolved=1, num_pairs=3, kendall_tau_resolved=1.0))  # fmt: skip
    text = write_report(tmp_path).read_text()
    assert "over the 1 of 3 pairs whose order at least 80% of the rounds agree on" in text
    assert "| full | 1.0 / 2.0 | 100.00 / 200.00 | 1.10 / 0.90 | 1.00 / - | 0.97 / 0.48 |" in text


def test_report_of_a_validation_with_hindsight_shows_it_beside_the_forecast(tmp_path):
    res = _probed_validation(tmp_path / "validate")
    hindsight = Comparison(tuple(replace(r, error=-0.02) for r in res.forecast.errors), 1.0, 0.02)
    configs = tuple(replace(c, step_dilation_runs=(1.25, 0.8)) for c in res.configurations)
    _write(tmp_path / "validate", replace(res, hindsight=hindsight, configurations=configs))
    text = write_report(tmp_path).read_text()
    assert "| full | throughput tok/s | 100 | 105 | -4.8% | +25.0% | -2.0% |" in text
    assert "in hindsight, each run at the speed its steps ran: 2.0% and tau 1.000" in text
    assert "| full | 1.0 / 2.0 | 100.00 / 200.00 | 1.10 / 0.90 | 1.25 / 0.80 |" in text
    assert (tmp_path / "figures" / "sim_vs_measured.png").read_bytes().startswith(PNG)


def test_report_shows_the_noise_floor_and_the_pairs_it_cannot_order(tmp_path):
    res = _probed_validation(tmp_path / "validate")
    noise = (
        NoiseRow("full", "throughput_tokens_per_s", median=100.0, mad_rel=0.02, low=97.0,
                 high=104.0, predicted=103.0, forecast_inside=True, hindsight_inside=True,
                 error_over_noise=1.5),
        NoiseRow("full", "tpot_mean_s", median=0.1, mad_rel=0.05, low=0.09, high=0.11,
                 predicted=0.2, forecast_inside=False, hindsight_inside=None,
                 error_over_noise=20.0),
    )  # fmt: skip
    _write(tmp_path / "validate", replace(res, noise=noise, forecast_inside_range=0.5, repeats=3,
                                          unordered_pairs=(("full", "shrink/x"),)))  # fmt: skip
    text = write_report(tmp_path).read_text()
    assert "| full | throughput tok/s | 100 | 2.0% | 97–104 | 103 | yes | yes | 1.5 |" in text
    assert "inside the range of 3 rounds 50% of the time" in text
    assert "| full | mean TPOT ms | 100 | 5.0% | 90–110 | 200 | no | – | 20.0 |" in text
    assert "Forecast inside the measured range on 1 of 2 configuration × metric pairs (50%" in text
    assert "cannot order" in text and "full vs shrink/x" in text


def test_a_perfect_forecast_lands_inside_n_rounds_range_as_often_as_the_report_says():
    # one more draw of the same noise against the range of n draws: (n - 1) / (n + 1)
    rng = np.random.default_rng(0)
    for n, said in ((3, "50%"), (5, "67%")):
        draws = rng.lognormal(0.0, 0.2, size=(200_000, n + 1))
        rounds, forecast = draws[:, :n], draws[:, n]
        inside = (rounds.min(1) <= forecast) & (forecast <= rounds.max(1))
        assert abs(inside.mean() - (n - 1) / (n + 1)) < 0.005
        assert f"{n} rounds {said} of the time" in _chance_inside(n)
