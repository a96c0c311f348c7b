"""Simulation metrics against hand-computed values (numpy's linear percentiles)."""

from __future__ import annotations

import json

import pytest

from testbed.errors import EetbError
from testbed.sim.errors import SimulationError
from testbed.sim.metrics import Metrics, RequestRecord, StepRecord, compute_metrics

T, F = True, False


def _request(rid, arrival_s, first_s, finish_s, layers, *, forced=0, preempted=0, flags=()):
    return RequestRecord(
        request_id=rid, arrival_s=arrival_s, first_token_s=first_s, finish_s=finish_s,
        num_prompt_tokens=16, num_output_tokens=len(layers), exit_layers=tuple(layers),
        num_forced_exits=forced, num_preemptions=preempted, agreement_flags=tuple(flags),
    )  # fmt: skip


def _step(start_s, executed, filled, blocks, preempted=0):
    return StepRecord(
        start_s=start_s, duration_s=0.5, num_row_layers_executed=executed,
        num_kv_only_row_layers=filled, num_blocks_used=blocks, num_preempted=preempted,
    )  # fmt: skip


# r0: TTFT 1, e2e 4, TPOT (4-1)/3 = 1;  r1: one token, TTFT 2, e2e 2, no TPOT;
# r2: TTFT 4, e2e 8, TPOT (10-6)/2 = 2.  Span 0 → 10 s, 8 output tokens.
REQUESTS = [
    _request(0, 0.0, 1.0, 4.0, [4, 2, 3, 4], forced=1, flags=[T, T, F, T]),
    _request(1, 1.0, 3.0, 3.0, [4], preempted=1, flags=[T]),
    _request(2, 2.0, 6.0, 10.0, [1, 2, 4], forced=2, flags=[F, T, T]),
]
STEPS = [_step(0.0, 10, 2, 5), _step(0.5, 7, 3, 9, preempted=1), _step(1.0, 4, 0, 6)]


@pytest.fixture(scope="module")
def metrics() -> Metrics:
    return compute_metrics(REQUESTS, STEPS)


def test_counts_and_throughput(metrics):
    assert metrics.num_requests == 3
    assert metrics.num_output_tokens == 8
    assert metrics.num_steps == 3
    assert metrics.duration_s == 10.0
    assert metrics.throughput_tokens_per_s == pytest.approx(0.8)
    assert metrics.throughput_requests_per_s == pytest.approx(0.3)


def test_ttft_percentiles(metrics):
    # sorted [1, 2, 4]: p90 at rank 1.8 → 2 + 0.8·2; p99 at rank 1.98 → 2 + 0.98·2
    assert metrics.ttft_mean_s == pytest.approx(7 / 3)
    assert metrics.ttft_p50_s == pytest.approx(2.0)
    assert metrics.ttft_p90_s == pytest.approx(3.6)
    assert metrics.ttft_p99_s == pytest.approx(3.96)


def test_tpot_leaves_out_single_token_requests(metrics):
    # [1, 2]: p50 1.5, p90 at rank 0.9 → 1.9, p99 → 1.99
    assert metrics.tpot_mean_s == pytest.approx(1.5)
    assert metrics.tpot_p50_s == pytest.approx(1.5)
    assert metrics.tpot_p90_s == pytest.approx(1.9)
    assert metrics.tpot_p99_s == pytest.approx(1.99)


def test_end_to_end_percentiles(metrics):
    # sorted [2, 4, 8]: p90 → 4 + 0.8·4, p99 → 4 + 0.98·4
    assert metrics.e2e_mean_s == pytest.approx(14 / 3)
    assert metrics.e2e_p50_s == pytest.approx(4.0)
    assert metrics.e2e_p90_s == pytest.approx(7.2)
    assert metrics.e2e_p99_s == pytest.approx(7.92)


def test_exit_layers_agreement_and_work(metrics):
    assert metrics.mean_exit_layer == pytest.approx(24 / 8)
    assert metrics.est_agreement == pytest.approx(6 / 8)
    assert metrics.num_involuntary_exits == 3
    assert metrics.num_preemptions == 1
    assert metrics.num_executed_row_layers == 21
    assert metrics.num_filled_row_layers == 5
    assert metrics.peak_kv_blocks == 9


def test_to_dict_is_json_and_round_trips(metrics):
    doc = json.loads(json.dumps(metrics.to_dict()))
    assert Metrics(**doc) == metrics


def test_table_shows_latencies_in_ms_and_totals(metrics):
    text = metrics.table()
    ttft = next(line for line in text.splitlines() if line.startswith("TTFT"))
    assert ttft.split()[1:] == ["2333.33", "2000.00", "3600.00", "3960.00"]
    assert "0.8 tokens/s" in text and "75.0%" in text and "peak KV blocks  9" in text


def test_single_token_requests_have_no_tpot_and_no_flags_no_agreement():
    m = compute_metrics([_request(0, 0.0, 1.0, 1.0, [3]), _request(1, 0.5, 2.0, 2.0, [5])], [])
    assert m.tpot_mean_s is None and m.tpot_p99_s is None
    assert m.est_agreement is None
    assert m.peak_kv_blocks == 0 and m.num_steps == 0
    assert m.mean_exit_layer == 4.0
    assert "-" in m.table()


def test_no_requests_is_a_typed_error():
    with pytest.raises(SimulationError, match="no request finished") as info:
        compute_metrics([], STEPS)
    assert isinstance(info.value, EetbError)


def test_a_run_that_took_no_time_is_an_error():
    with pytest.raises(SimulationError, match="no simulated time"):
        compute_metrics([_request(0, 1.0, 1.0, 1.0, [2])], [])


@pytest.mark.parametrize(
    "times_s, layers, flags, match",
    [
        ((1.0, 2.0, 3.0), [], (), "no output tokens"),
        ((1.0, 0.5, 3.0), [1, 2], (), "out of order"),
        ((1.0, 2.0, 1.5), [1, 2], (), "out of order"),
        ((1.0, 2.0, 3.0), [1, 2], (T,), "one agreement flag per output token"),
    ],
)
def test_inconsistent_records_are_refused(times_s, layers, flags, match):
    with pytest.raises(ValueError, match=match):
        _request(0, *times_s, layers, flags=flags)


def test_one_exit_layer_per_output_token():
    with pytest.raises(ValueError, match="one exit layer per output token"):
        RequestRecord(
            request_id=0, arrival_s=0.0, first_token_s=1.0, finish_s=2.0, num_prompt_tokens=4,
            num_output_tokens=3, exit_layers=(1, 2), num_forced_exits=0, num_preemptions=0,
        )  # fmt: skip
