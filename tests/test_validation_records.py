"""validation.json's records: written and read back unchanged, a bad document refused by name."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from testbed.compare import error_rows, noise_rows
from testbed.validation_records import (
    VALIDATION_SCHEMA_VERSION,
    Comparison,
    ConfigResult,
    FitSummary,
    Missing,
    ResultsError,
    ValidationResults,
)

finite = st.floats(-1e6, 1e6, allow_nan=False)
maybe = st.none() | finite


def _config(index: int, label: str, value: float | None) -> ConfigResult:
    return ConfigResult(
        index=index, label=label, policy={"batching": "consensus", "threshold": 0.9},
        measured={"throughput_tokens_per_s": 100.0, "tpot_mean_s": value},
        predicted={"throughput_tokens_per_s": 110.0, "tpot_mean_s": 0.01},
        exit_hist_measured=(0.25, 0.75), exit_hist_predicted=(0.5, 0.5), exit_hist_tv=0.25,
        mean_exit_layer_measured=1.75, mean_exit_layer_predicted=None,
        predicted_hindsight={"throughput_tokens_per_s": 101.0, "tpot_mean_s": None},
        throughput_runs=(99.0, 100.0, 101.0), tpot_mean_runs_s=(0.01, None, 0.02),
        cpu_share_runs=(0.93, None, 1.0),
    )  # fmt: skip


@given(value=maybe, tau=maybe, labels=st.lists(st.text(min_size=1, max_size=8), max_size=4))
def test_results_round_trip_through_json_unchanged(value, tau, labels):
    configs = tuple(_config(i, label, value) for i, label in enumerate(labels))
    runs = [{"throughput_tokens_per_s": 100.0, "tpot_mean_s": value}] * 3
    res = ValidationResults(
        engine="native", workload="poisson:rate=2,n=10", cost_model="roofline:H100:llama-2-7b",
        configurations=configs,
        forecast=Comparison(tuple(error_rows("a", {"tpot_mean_s": value}, {"tpot_mean_s": 1.0})),
                            tau, None),
        hindsight=Comparison((), tau, 0.5), fit=FitSummary(0.9, 12, {"per_token": 1e-4}),
        noise=tuple(noise_rows("a", runs, {"throughput_tokens_per_s": 100.0}, None)),
        unordered_pairs=tuple((a, b) for a, b in zip(labels, labels[1:], strict=False)),
        missing=(Missing("rebatch/x", "ConfigError: no"),), config={"repeats": 3},
    )  # fmt: skip
    again = ValidationResults.from_json(json.loads(json.dumps(res.to_json())))
    assert again == res


def _doc() -> dict:
    res = ValidationResults(engine="native", workload="w", cost_model="c",
                            configurations=(_config(0, "full", 0.01),), forecast=Comparison())  # fmt: skip
    return json.loads(json.dumps(res.to_json()))


def test_a_document_of_another_schema_version_is_refused():
    doc = _doc()
    doc["schema_version"] = VALIDATION_SCHEMA_VERSION - 1
    with pytest.raises(ResultsError, match="schema version"):
        ValidationResults.from_json(doc)


def test_a_missing_or_misshapen_field_is_named():
    doc = _doc()
    del doc["configurations"][0]["exit_hist_tv"]
    with pytest.raises(ResultsError, match=r"configurations\[0\]: no field 'exit_hist_tv'"):
        ValidationResults.from_json(doc)
    doc = _doc()
    doc["forecast"] = [1, 2]
    with pytest.raises(ResultsError, match="forecast: expected an object"):
        ValidationResults.from_json(doc)
    doc = _doc()
    doc["unordered_pairs"] = [["a", "b", "c"]]
    with pytest.raises(ResultsError, match=r"unordered_pairs\[0\]: expected 2 items"):
        ValidationResults.from_json(doc)


def test_read_names_the_file(tmp_path):
    (tmp_path / "validation.json").write_text("{not json")
    with pytest.raises(ResultsError, match="validation.json is not valid JSON"):
        ValidationResults.read(tmp_path / "validation.json")


def test_comparison_finds_one_error():
    cmp = Comparison(tuple(error_rows("a", {"tpot_mean_s": 0.012}, {"tpot_mean_s": 0.01})))
    assert cmp.error_of("a", "tpot_mean_s") == pytest.approx(0.2)
    assert cmp.error_of("b", "tpot_mean_s") is None
