"""Trace capture: schema round trip, replay, oracle flags, bad files, interrupted captures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import get_num_threads as torch_threads

from policies import ExitPoints, HiddenCosineRule, PolicyConfigError
from testbed.capture_records import (
    CaptureConfig,
    CaptureRequest,
    EngineConfig,
    covering_oracle,
    oracle_layers,
)
from testbed.core.policy_set import PolicyConfig
from testbed.engine.capture import run_capture
from testbed.sim.errors import SimulationError
from testbed.sim.first_exit import replay_exit_layers
from testbed.sim.simulator import SimulationConfig, simulate
from testbed.trace import (
    SCHEMA_VERSION,
    SCHEMAS,
    CaptureWriter,
    TraceError,
    read_capture,
    signal_matrix,
)
from testbed.vllm_backend.records import StepRecord, steps_row
from tests.engine_helpers import TINY, prompts, tiny_checkpoint

L = TINY.num_hidden_layers


def _requests(n=5, max_tokens=10, seed=0):
    return [
        CaptureRequest(i, 0.01 * i, tuple(p), max_tokens)
        for i, p in enumerate(prompts(n, seed=seed))
    ]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=2)


@pytest.fixture(scope="module")
def oracle(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("caps") / "oracle"
    run_capture(ckpt, _requests(), CaptureConfig(mode="oracle", profile_layers=True), out)
    return out


@pytest.fixture(scope="module")
def live(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("caps") / "live"
    pc = PolicyConfig(batching="shrink", exit_rule="hidden", threshold=0.9, min_exit_layer=2)
    run_capture(ckpt, _requests(), CaptureConfig(mode="live", engine=EngineConfig(policy=pc)), out)
    return out


def _row(table: str, **over):
    base = {f.name: None for f in SCHEMAS[table]}
    return base | over


def test_round_trip_of_every_table(tmp_path):
    meta = {"mode": "oracle", "model": {"num_layers": 3}}
    rows = {
        "requests": [_row("requests", request_id=7, arrival_s=0.5, num_prompt_tokens=4,
                          num_output_tokens=2, max_tokens=2, first_token_s=0.6, finish_s=0.9,
                          num_preemptions=0)],
        "tokens": [_row("tokens", request_id=7, position=i, token_id=10 + i, exit_layer=3,
                        is_forced=False, executed_layers=3, filled_layers=0,
                        softmax_margin=[0.1, 0.2, 0.3], hidden_cosine=[0.5, None, 0.9],
                        matches_final=[False, True, True]) for i in range(2)],
        "steps": [_row("steps", step_id=0, start_s=0.0, duration_s=0.01, num_rows=1,
                       num_prefill_tokens=4, num_decode_rows=0, num_context_tokens=4,
                       num_row_layers_executed=12, num_kv_only_row_layers=0, num_rule_evals=0,
                       num_forced_exits=0, num_preempted=0, num_layers_run=3, num_exit_points=0,
                       layer_times_s=[0.001] * 3, num_attention_pairs=30,
                       num_sampling_layers=1, cpu_s=0.008)],
    }  # fmt: skip
    with CaptureWriter(tmp_path / "cap", meta, rows_per_group=1) as w:
        for table, items in rows.items():
            for r in items:
                w.append(table, r)
    cap = read_capture(tmp_path / "cap")
    assert cap.meta["schema_version"] == SCHEMA_VERSION == 4 and not cap.is_partial
    for table, items in rows.items():
        got = getattr(cap, table).to_pylist()
        assert len(got) == len(items)
        for g, e in zip(got, items, strict=True):
            for k, v in e.items():
                if isinstance(v, list):
                    assert (
                        g[k] == pytest.approx(v, nan_ok=True) if None not in v else g[k][1] is None
                    )
                elif isinstance(v, float):
                    assert g[k] == pytest.approx(v)
                else:
                    assert g[k] == v


def test_live_capture_replays_to_the_recorded_exit_layers(live):
    cap = read_capture(live)
    recorded = cap.tokens["exit_layer"].to_numpy()
    replayed = replay_exit_layers(
        cap, HiddenCosineRule(threshold=0.9), ExitPoints(min_exit_layer=2)
    )
    assert (replayed == recorded).all()
    assert (recorded < L).any(), "the live run never exited early: the test proves nothing"


def test_a_capture_runs_past_eos_only_for_requests_that_ignore_it(ckpt, tmp_path, monkeypatch):
    """Workload eos=ignore reaches the engine: such a request generates exactly max_tokens
    (a trace replay's length); the others end at their first EOS token."""
    reqs = _requests(n=3, max_tokens=8)
    run_capture(ckpt, [replace(r, ignore_eos=True) for r in reqs], CaptureConfig(mode="live"),
                tmp_path / "probe")  # fmt: skip
    tokens = read_capture(tmp_path / "probe").tokens
    first = [t for r, t in zip(tokens["request_id"].to_pylist(), tokens["token_id"].to_pylist(),
                               strict=True) if r == 0]  # fmt: skip
    # make request 0's third token the end-of-sequence token
    monkeypatch.setattr(ckpt.model, "config", replace(ckpt.config, eos_token_id=first[2]))
    run_capture(ckpt, reqs, CaptureConfig(mode="live"), tmp_path / "stop")
    run_capture(ckpt, [replace(r, ignore_eos=True) for r in reqs], CaptureConfig(mode="live"),
                tmp_path / "ignore")  # fmt: skip
    stop = read_capture(tmp_path / "stop").requests["num_output_tokens"].to_pylist()
    ignore = read_capture(tmp_path / "ignore").requests["num_output_tokens"].to_pylist()
    assert ignore == [8, 8, 8]
    assert stop[0] == 3 and max(stop) <= 8


def test_steps_count_causal_attention_pairs_per_layer_run(ckpt, tmp_path):
    """One prompt of n tokens at full depth: the prefill scores 1 + ... + n pairs per layer,
    each decode step at position p scores p + 1; and an early-exit run counts only the layers
    its tokens ran (shrink stops rows early)."""
    n, new_tokens = 9, 4
    req = [CaptureRequest(0, 0.0, tuple(prompts(1, seed=5, lo=n, hi=n + 1)[0]), new_tokens)]
    run_capture(ckpt, req, CaptureConfig(mode="live"), tmp_path / "full")
    pairs = read_capture(tmp_path / "full").steps["num_attention_pairs"].to_pylist()
    assert pairs == [L * n * (n + 1) // 2] + [L * (n + k + 1) for k in range(new_tokens - 1)]
    pc = PolicyConfig(batching="shrink", exit_rule="hidden", threshold=0.0, min_exit_layer=1)
    run_capture(ckpt, req, CaptureConfig(mode="live", engine=EngineConfig(policy=pc)),
                tmp_path / "early")  # fmt: skip
    cap = read_capture(tmp_path / "early")
    executed = cap.tokens["executed_layers"].to_pylist()[1:]  # the decode tokens
    early = cap.steps["num_attention_pairs"].to_pylist()
    assert early[0] == pairs[0]  # prompts always run every layer
    assert early[1:] == [e * (n + k + 1) for k, e in enumerate(executed)]
    assert max(executed) < L


def test_steps_count_one_sampling_layer_per_exit_layer_of_their_tokens(ckpt, tmp_path):
    """`full` takes every token at the last layer: one sampling call a step. An early-exit run
    whose rows exit at different layers pays one per distinct exit layer of the step."""
    reqs = [CaptureRequest(i, 0.0, tuple(p), 6) for i, p in enumerate(prompts(6, seed=3))]
    run_capture(ckpt, reqs, CaptureConfig(mode="live"), tmp_path / "full")
    assert set(read_capture(tmp_path / "full").steps["num_sampling_layers"].to_pylist()) == {1}
    pc = PolicyConfig(batching="consensus", exit_rule="hidden", threshold=0.9, min_exit_layer=1)
    run_capture(ckpt, reqs, CaptureConfig(mode="live", engine=EngineConfig(policy=pc)),
                tmp_path / "early")  # fmt: skip
    cap = read_capture(tmp_path / "early")
    sampling = cap.steps["num_sampling_layers"].to_pylist()
    decode_rows = cap.steps["num_decode_rows"].to_pylist()
    assert max(sampling) > 1, "every step's rows exited together: the test proves nothing"
    # never more calls than rows taking a token (decode rows, plus prompts that completed)
    assert all(1 <= s <= max(d, 1) + 6 for s, d in zip(sampling, decode_rows, strict=True))
    layers = {int(x) for x in cap.tokens["exit_layer"].to_pylist()}
    assert max(sampling) <= len(layers)


def test_steps_record_the_process_cpu_time_of_each_step(oracle):
    """Each step's CPU seconds are measured beside its wall time: positive (the forward ran
    on this process's threads) and, over the run, no more than its wall time allows."""
    steps = read_capture(oracle).steps
    cpu, wall = np.array(steps["cpu_s"].to_pylist()), np.array(steps["duration_s"].to_pylist())
    assert (cpu > 0).all()
    # process time sums every thread, so a step may use up to threads x wall (+ clock grain)
    assert cpu.sum() <= wall.sum() * max(1, torch_threads()) + 0.01 * len(cpu)


def test_schema_3_capture_reads_with_cpu_time_unknown(oracle, tmp_path):
    """A capture from before steps carried cpu_s still reads (its CPU time is null); a capture
    that claims schema 4 without the column is refused."""
    old = _copy_capture(oracle, tmp_path / "v3")
    _rewrite(old, "steps", lambda t: t.drop_columns(["cpu_s"]))
    meta = json.loads((old / "meta.json").read_text())
    (old / "meta.json").write_text(json.dumps(meta | {"schema_version": 3}))
    steps = read_capture(old).steps
    assert steps.num_rows == read_capture(oracle).steps.num_rows
    assert steps["cpu_s"].null_count == steps.num_rows
    (old / "meta.json").write_text(json.dumps(meta))  # schema 4, column absent
    with pytest.raises(TraceError, match="missing column 'cpu_s'"):
        read_capture(old)


def test_oracle_final_layer_agrees_with_the_emitted_token(oracle):
    cap = read_capture(oracle)
    matches = signal_matrix(cap.tokens, "matches_final", L)
    assert (matches[:, L - 1] == 1).all()
    assert (matches[:, : L - 1] == 0).any(), "every layer agreeing would make replay trivial"
    assert (cap.tokens["exit_layer"].to_numpy() == L).all()
    for col in ("softmax_margin", "hidden_cosine", "classifier_prob"):
        assert not np.isnan(signal_matrix(cap.tokens, col, L)).any()
    times = cap.steps["layer_times_s"].to_pylist()
    assert all(len(t) == L for t in times)


def _at_once(n=5):
    """Requests that all arrive at 0: every capture of them runs the same batches (arrival
    pacing on the wall clock could batch them apart, and batching moves the floats)."""
    return [replace(r, arrival_s=0.0) for r in _requests(n)]


@pytest.fixture(scope="module")
def oracles(ckpt, tmp_path_factory):
    """(every layer, exit points 2 and 4 only and the last layer 6) of the same requests."""
    root = tmp_path_factory.mktemp("caps")
    points = EngineConfig(policy=PolicyConfig(min_exit_layer=2, exit_stride=2))
    run_capture(ckpt, _at_once(), CaptureConfig(mode="oracle"), root / "full")
    run_capture(ckpt, _at_once(), CaptureConfig(mode="oracle", engine=points), root / "sparse")
    return root / "full", root / "sparse"


@pytest.fixture(scope="module")
def sparse_oracle(oracles):
    return oracles[1]


def test_an_oracle_of_a_few_exit_points_records_the_full_oracle_s_values_there_only(oracles):
    full, sparse = (read_capture(path) for path in oracles)
    assert sparse.meta["oracle_layers"] == [2, 4, L] and sparse.oracle_layers == (2, 4, L)
    assert full.oracle_layers == tuple(range(1, L + 1))
    assert sparse.meta["policy"]["batching"] == "full"  # an oracle runs full depth regardless
    # rows in the order of each request's stream (arrival pacing may interleave steps apart)
    a_tokens, b_tokens = (c.tokens.sort_by([("request_id", "ascending"), ("position", "ascending")])
                          for c in (full, sparse))  # fmt: skip
    assert b_tokens["token_id"].to_pylist() == a_tokens["token_id"].to_pylist()
    recorded = np.array([2, 4, L]) - 1
    skipped = np.setdiff1d(np.arange(L), recorded)
    for col in ("softmax_margin", "hidden_cosine", "classifier_prob", "matches_final"):
        a, b = signal_matrix(a_tokens, col, L), signal_matrix(b_tokens, col, L)
        np.testing.assert_allclose(b[:, recorded], a[:, recorded], rtol=1e-5, atol=1e-6)
        assert np.isnan(b[:, skipped]).all(), col


def test_a_replay_of_a_sparse_oracle_equals_the_full_oracle_s_at_its_points(oracles):
    workload = "poisson:rate=50,n=5,prompt=8-16,output=10"
    for rule in ("hidden", "softmax", "classifier"):
        policy = PolicyConfig(batching="shrink", exit_rule=rule, threshold=0.5,
                              min_exit_layer=2, exit_stride=2)  # fmt: skip
        results = [
            simulate(SimulationConfig(trace=str(t), workload=workload, policy=policy))
            for t in oracles
        ]
        assert results[0].metrics == results[1].metrics, rule
    exits = []
    for trace in oracles:
        cap = read_capture(trace)
        layers = replay_exit_layers(cap, HiddenCosineRule(0.5), ExitPoints(2, 2)).tolist()
        keys = zip(
            cap.tokens["request_id"].to_pylist(), cap.tokens["position"].to_pylist(), strict=True
        )
        exits.append(dict(zip(keys, layers, strict=True)))
    assert exits[0] == exits[1] and set(exits[1].values()) == {2, 4, L}


@pytest.mark.parametrize("points", [(1, 2), (3, 1), (2, 1)])
def test_a_replay_at_exit_points_the_oracle_did_not_record_is_refused(sparse_oracle, points):
    policy = PolicyConfig(batching="shrink", min_exit_layer=points[0], exit_stride=points[1])
    cfg = SimulationConfig(trace=str(sparse_oracle), workload="poisson:rate=9,n=2,prompt=8,output=4",
                           policy=policy)  # fmt: skip
    with pytest.raises(SimulationError, match=r"only at layers 2, 4, not at"):
        simulate(cfg)
    with pytest.raises(SimulationError, match="--min-exit-layer"):
        replay_exit_layers(read_capture(sparse_oracle), HiddenCosineRule(0.9), ExitPoints(*points))


def test_an_oracle_with_no_exit_point_in_the_model_is_refused_before_it_runs(ckpt, tmp_path):
    deep = EngineConfig(policy=PolicyConfig(min_exit_layer=L))
    with pytest.raises(PolicyConfigError, match="leaves no exit point"):
        run_capture(ckpt, _requests(), CaptureConfig(mode="oracle", engine=deep), tmp_path / "c")
    assert not (tmp_path / "c").exists()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 20), st.integers(1, 6)), min_size=1, max_size=4))
def test_the_covering_oracle_holds_every_policy_s_exit_points_and_no_shallower(points):
    policies = [PolicyConfig(batching="shrink", min_exit_layer=m, exit_stride=s)
                for m, s in points] + [PolicyConfig()]  # fmt: skip
    cover = covering_oracle(policies)
    recorded = set(oracle_layers(cover, 24))
    for p in policies[:-1]:
        assert set(ExitPoints(p.min_exit_layer, p.exit_stride).layers(24)) <= recorded
    assert cover.min_exit_layer == min(m for m, _ in points)
    assert covering_oracle([PolicyConfig()]) == PolicyConfig()  # full depth alone: every layer


def test_an_oracle_s_steps_time_the_step_without_the_oracle_s_own_recording(
    ckpt, tmp_path, monkeypatch
):
    """A cost model fitted on an oracle must see a plain full-depth step's time: on SmolLM2 the
    oracle's LM heads made its steps 2.2x a plain step's, and a fit on them priced plain runs
    at 2.2x. Here the oracle's work is made 0.2 s a step: none of it may reach duration_s."""
    import testbed.engine.recorder as recorder

    real = recorder.oracle_signals

    def slow(*args, **kwargs):
        time.sleep(0.2)
        return real(*args, **kwargs)

    monkeypatch.setattr(recorder, "oracle_signals", slow)
    out = tmp_path / "slow"
    run_capture(ckpt, _at_once(2), CaptureConfig(mode="oracle"), out)
    steps = read_capture(out).steps
    assert steps.num_rows >= 3
    assert max(steps["duration_s"].to_pylist()) < 0.2 * 0.5
    starts = steps["start_s"].to_numpy()
    assert (np.diff(starts) >= 0.2).all()  # the recording still happened between the steps


def test_a_vllm_oracle_step_s_time_leaves_out_its_recording():
    step = StepRecord(rows=(), num_row_layers_executed=0, num_kv_only_row_layers=0,
                      num_rule_evals=0, num_forced_exits=0, num_exit_points=0, num_layers_run=8,
                      forward_s=0.0, recording_s=0.3, recording_cpu_s=0.5)  # fmt: skip
    row = steps_row(0, 1.0, 1.0, step, cpu_s=2.0)
    assert row["duration_s"] == pytest.approx(0.7) and row["cpu_s"] == pytest.approx(1.5)
    assert StepRecord.from_json(step.to_json()) == step  # a serve log carries it
    old = step.to_json()
    del old["recording_s"], old["recording_cpu_s"]  # a log written before the field
    assert steps_row(0, 1.0, 1.0, StepRecord.from_json(old))["duration_s"] == 1.0


def _copy_capture(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _rewrite(path: Path, table: str, fn) -> None:
    t = pq.read_table(path / f"{table}.parquet")
    pq.write_table(fn(t), path / f"{table}.parquet")


BAD_FILES = {
    "no_meta": (lambda p: (p / "meta.json").unlink(), "meta.json is missing"),
    "bad_meta_json": (lambda p: (p / "meta.json").write_text("{"), "not valid JSON"),
    "wrong_version": (
        lambda p: (p / "meta.json").write_text(
            json.dumps(json.loads((p / "meta.json").read_text()) | {"schema_version": 99})
        ),
        "schema version 99",
    ),
    "missing_table": (lambda p: (p / "steps.parquet").unlink(), "steps.parquet is missing"),
    "corrupt": (
        lambda p: (p / "tokens.parquet").write_bytes(b"garbage" * 50),
        "corrupt or truncated",
    ),
    "truncated": (
        lambda p: (p / "tokens.parquet").write_bytes((p / "tokens.parquet").read_bytes()[:300]),
        "corrupt or truncated",
    ),
    "missing_column": (
        lambda p: _rewrite(p, "tokens", lambda t: t.drop_columns(["token_id"])),
        "missing column 'token_id'",
    ),
    "wrong_type": (
        lambda p: _rewrite(
            p,
            "tokens",
            lambda t: t.set_column(
                t.schema.get_field_index("position"), "position", t["position"].cast(pa.int64())
            ),
        ),
        "column 'position' is int64, expected int32",
    ),  # fmt: skip
    "extra_column": (
        lambda p: _rewrite(p, "steps", lambda t: t.append_column("bogus", t["step_id"])),
        "unexpected column 'bogus'",
    ),
    "negative_time": (
        lambda p: _rewrite(
            p,
            "steps",
            lambda t: t.set_column(
                t.schema.get_field_index("duration_s"), "duration_s", pa.array([-1.0] * t.num_rows)
            ),
        ),
        "duration_s is negative",
    ),  # fmt: skip
    "nan_signal": (
        lambda p: _rewrite(
            p,
            "tokens",
            lambda t: t.set_column(
                t.schema.get_field_index("hidden_cosine"),
                "hidden_cosine",
                pa.array([[float("nan")] * L] * t.num_rows, pa.list_(pa.float32())),
            ),
        ),
        "hidden_cosine holds NaN",
    ),  # fmt: skip
    "positions_out_of_order": (
        lambda p: _rewrite(p, "tokens", lambda t: t.take(list(range(t.num_rows))[::-1])),
        "position out of order",
    ),
    "partial": (
        lambda p: (p / "meta.json").write_text(
            json.dumps(json.loads((p / "meta.json").read_text()) | {"is_partial": True})
        ),
        "partial capture",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_capture_rejected_with_its_own_message(oracle, tmp_path, case):
    damage, message = BAD_FILES[case]
    bad = _copy_capture(oracle, tmp_path / "bad")
    damage(bad)
    with pytest.raises(TraceError, match=message.replace("(", r"\(")):
        read_capture(bad)


_CAPTURE_SCRIPT = """
import signal, sys
from pathlib import Path
# Ctrl-C as in a shell, whatever the test process passed on
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
from tests.engine_helpers import tiny_checkpoint, prompts
from testbed.capture_records import CaptureConfig, CaptureRequest
from testbed.engine.capture import run_capture
ck = tiny_checkpoint(Path(sys.argv[1]) / "ckpt")
# arrivals over 100 s: the capture is still running whenever the test stops it
reqs = [CaptureRequest(i, 0.05 * i, tuple(p), 64) for i, p in enumerate(prompts(2000, seed=1))]
print("start", flush=True)
run_capture(ck, reqs, CaptureConfig(mode="oracle"), Path(sys.argv[1]) / "cap")
"""


def _start_capture(tmp_path: Path) -> subprocess.Popen:
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [sys.executable, "-c", _CAPTURE_SCRIPT, str(tmp_path)],
        cwd=repo, stdout=subprocess.PIPE, text=True, env=os.environ | {"PYTHONPATH": str(repo)},
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "start"
    deadline = time.monotonic() + 60
    while not (tmp_path / "cap.partial").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # let it write some steps
    return proc


def test_killed_capture_leaves_nothing_that_reads_as_complete(tmp_path):
    proc = _start_capture(tmp_path)
    proc.kill()
    proc.wait(timeout=30)
    assert not (tmp_path / "cap").exists()
    with pytest.raises(TraceError, match="unfinished capture"):
        read_capture(tmp_path / "cap.partial")


def test_interrupted_capture_is_marked_partial_and_readable(tmp_path):
    proc = _start_capture(tmp_path)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) != 0  # interrupted, not finished
    with pytest.raises(TraceError, match="partial capture"):
        read_capture(tmp_path / "cap")
    cap = read_capture(tmp_path / "cap", allow_partial=True)
    assert cap.is_partial and cap.steps.num_rows > 0
