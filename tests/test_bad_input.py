"""Inputs that used to give a traceback or a silently wrong answer: each now gives one clear
line (a typed error, exit code 2 from the CLI) or an answer that says what it changed."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from policies import PolicyConfigError, create
from testbed.core.policy_set import PolicyConfig, build_policies
from testbed.locks import LOCK_FILE, exclusive
from testbed.sim.hardware import ModelShape
from testbed.sim.simulator import SimulationConfig, simulate
from testbed.sweep import GridError, open_executor, run_key, run_sweep
from testbed.trace import SCHEMA_VERSION, SCHEMAS, CaptureWriter, TraceError, read_capture
from testbed.workload.readers import read_mooncake_jsonl
from tests.sweep_fakes import fake_run

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "traces" / "samples" / "oracle_cnndm"  # the built-in model: 1024-token context


def _eetb(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "testbed.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def _one_line_exit_2(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [x for x in result.stderr.splitlines() if not x.startswith("INFO ")]
    assert len(lines) == 1 and lines[0].startswith("eetb: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# ---- 1. the simulator prices the workload's lengths up to the cost model's context ------------


def test_simulate_takes_long_requests_up_to_the_cost_models_context():
    work = "poisson:rate=2,n=6,prompt=3000,output=40"
    seven_b = simulate(SimulationConfig(str(SAMPLE), work, cost_model="roofline:H100:llama-2-7b"))
    assert seven_b.config.max_model_len == 4096  # Llama-2-7B's context, not the trace model's
    assert seven_b.clip.num_requests_clipped == 0
    assert seven_b.metrics.num_output_tokens == 6 * 40
    own = simulate(SimulationConfig(str(SAMPLE), work, cost_model="roofline:H100"))
    assert own.config.max_model_len == 1024  # the trace's own model: it must clip, and says so
    assert own.clip.num_requests_clipped == 6 and own.clip.num_prompts_clipped == 6
    asked = simulate(SimulationConfig(str(SAMPLE), "poisson:rate=2,n=3,prompt=5000,output=40",
                                      cost_model="roofline:H100", max_model_len=8192))  # fmt: skip
    assert asked.clip.num_requests_clipped == 0 and asked.metrics.num_output_tokens == 3 * 40


def test_simulate_cli_says_when_it_clips_and_records_the_counts(tmp_path):
    result = _eetb("simulate", "--trace", str(SAMPLE), "--cost-model", "roofline:H100",
                   "--workload", "poisson:rate=2,n=4,prompt=5000,output=20",
                   "--out", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "4 of 4 requests clipped to max_model_len 1024" in result.stderr
    doc = json.loads((tmp_path / "result.json").read_text())
    assert doc["clip"]["num_requests_clipped"] == 4 and doc["config"]["max_model_len"] == 1024
    assert "4096 K/V blocks of 16 tokens, max_model_len 1024" in result.stdout  # what it ran


def test_model_shapes_carry_their_context():
    assert ModelShape.preset("llama-3-8b").max_context_tokens == 8192
    meta = json.loads((SAMPLE / "meta.json").read_text())
    assert ModelShape.from_capture_meta(meta).max_context_tokens == 1024


# ---- 2. one writer per capture, and no complete capture whose tables miss rows ---------------


def _request_row(rid: int, num_tokens: int) -> dict:
    return {f.name: None for f in SCHEMAS["requests"]} | dict(
        request_id=rid, arrival_s=0.0, num_prompt_tokens=4, num_output_tokens=num_tokens,
        max_tokens=num_tokens, first_token_s=0.1, finish_s=0.2, num_preemptions=0,
    )  # fmt: skip


def _token_row(rid: int, position: int) -> dict:
    return {f.name: None for f in SCHEMAS["tokens"]} | dict(
        request_id=rid, position=position, token_id=5, exit_layer=2, is_forced=False,
        executed_layers=2, filled_layers=0,
    )  # fmt: skip


META = {"mode": "live", "model": {"num_layers": 2, "config": {}}}


def test_a_second_capture_to_the_same_out_refuses_and_the_first_completes(tmp_path):
    out = tmp_path / "cap"
    with CaptureWriter(out, META) as first:
        with pytest.raises(TraceError, match="another capture is writing"):
            CaptureWriter(out, META)
        first.append("requests", _request_row(0, 1))
        first.append("tokens", _token_row(0, 0))
    cap = read_capture(out)
    assert not cap.is_partial and cap.tokens.num_rows == 1
    with pytest.raises(TraceError, match="already exists"):  # and the lock was released
        CaptureWriter(out, META)


def test_a_capture_whose_tokens_miss_a_request_is_kept_partial_not_complete(tmp_path):
    out = tmp_path / "cap"
    missing = pytest.raises(TraceError, match="request 0 has 1 token rows for 3 output tokens")
    with missing, CaptureWriter(out, META) as w:
        w.append("requests", _request_row(0, 3))
        w.append("tokens", _token_row(0, 0))
    assert json.loads((out / "meta.json").read_text())["is_partial"] is True


# ---- 3. partial captures: read their finished requests; streams flush by time ----------------


def _partial_capture(path: Path) -> Path:
    with pytest.raises(KeyboardInterrupt), CaptureWriter(path, META) as w:
        w.append("requests", _request_row(0, 2))
        for pos in range(2):
            w.append("tokens", _token_row(0, pos))
        w.append("tokens", _token_row(1, 0))  # request 1 is still in flight
        raise KeyboardInterrupt
    return path


def test_a_partial_capture_reads_as_its_finished_requests(tmp_path):
    path = _partial_capture(tmp_path / "cap")
    with pytest.raises(TraceError, match="--allow-partial"):
        read_capture(path)
    cap = read_capture(path, allow_partial=True)
    assert cap.is_partial and cap.tokens["request_id"].to_pylist() == [0, 0]


def test_simulate_has_allow_partial(tmp_path):
    part = tmp_path / "part"
    shutil.copytree(SAMPLE, part)
    meta = json.loads((part / "meta.json").read_text()) | {"is_partial": True}
    (part / "meta.json").write_text(json.dumps(meta))
    args = ["simulate", "--trace", str(part), "--workload", "poisson:rate=4,n=4,prompt=16,output=8"]
    _one_line_exit_2(_eetb(*args), "--allow-partial")
    assert _eetb(*args, "--allow-partial").returncode == 0


def test_capture_row_groups_reach_the_disk_by_time(tmp_path):
    with CaptureWriter(tmp_path / "cap", META, flush_interval_s=0.05) as w:
        file = w.tmp / "tokens.parquet.tmp"
        empty = file.stat().st_size
        w.append("requests", _request_row(0, 2))
        w.append("tokens", _token_row(0, 0))
        time.sleep(0.1)
        w.append("tokens", _token_row(0, 1))  # the interval has passed: everything goes out
        assert file.stat().st_size > empty and not w._buffers["tokens"]


# ---- 4. sweeps: torn points are redone, one sweep per folder, Ctrl-C stops at once -----------


@pytest.fixture
def two_configs():
    return [SimulationConfig("t", "poisson:rate=1,n=2", PolicyConfig(), seed=s) for s in (0, 1)]


def _sweep(configs, out):
    with ThreadPoolExecutor(max_workers=1) as pool:
        return run_sweep(configs, out, executor=pool, run_fn=fake_run)


def test_a_torn_point_file_is_run_again_with_a_line(two_configs, tmp_path, capsys):
    _sweep(two_configs, tmp_path)
    torn = tmp_path / "runs" / f"{run_key(two_configs[0])}.json"
    torn.write_text(torn.read_text()[:40])
    report = _sweep(two_configs, tmp_path)
    assert (report.num_finished, report.num_skipped, len(report.rows)) == (1, 1, 2)
    assert "unreadable" in capsys.readouterr().err
    assert json.loads(torn.read_text())["metrics"]


def test_a_second_sweep_on_one_folder_refuses(two_configs, tmp_path):
    held = exclusive(tmp_path / LOCK_FILE, lambda: AssertionError("not held"))
    with held, pytest.raises(GridError, match="another sweep is writing"):
        _sweep(two_configs, tmp_path)
    assert not (tmp_path / "runs" / f"{run_key(two_configs[0])}.json").exists()


def test_an_interrupted_process_pool_stops_without_waiting_for_running_points():
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt), open_executor(None, 1) as pool:
        pool.submit(time.sleep, 60)
        time.sleep(0.5)  # the worker has started the point
        raise KeyboardInterrupt
    assert time.monotonic() - start < 10


# ---- 5. structurally wrong captures -------------------------------------------------------------


def _damaged(tmp_path: Path, fix) -> Path:
    path = tmp_path / "bad"
    shutil.copytree(SAMPLE, path)
    fix(path)
    return path


def _edit_meta(path: Path, fn) -> None:
    (path / "meta.json").write_text(json.dumps(fn(json.loads((path / "meta.json").read_text()))))


@pytest.mark.parametrize(
    ("fix", "message"),
    [
        (lambda p: _edit_meta(p, lambda m: {k: v for k, v in m.items() if k != "model"}),
         "no 'model' object"),
        (lambda p: (p / "meta.json").write_text("[1, 2]"), "expected a JSON object, got list"),
        (lambda p: _edit_meta(p, lambda m: m | {"schema_version": str(SCHEMA_VERSION)}),
         f"schema version '{SCHEMA_VERSION}' (a string)"),
        (lambda p: _edit_meta(p, lambda m: m | {"model": m["model"] | {"num_layers": "8"}}),
         "model.num_layers is '8'"),
        (lambda p: pq.write_table(pq.read_table(p / "requests.parquet").slice(1),
                                  p / "requests.parquet"),
         "has no row in requests.parquet"),
        (lambda p: pq.write_table(pq.read_table(p / "tokens.parquet").slice(1),
                                  p / "tokens.parquet"),
         "token rows for num_output_tokens"),
    ],
    ids=["no_model", "meta_list", "string_version", "string_layers", "missing_request",
         "missing_token"],
)  # fmt: skip
def test_structurally_wrong_captures_are_one_line(tmp_path, fix, message):
    bad = _damaged(tmp_path, fix)
    with pytest.raises(TraceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_capture(bad)
    _one_line_exit_2(_eetb("trace", "info", str(bad)), message)


# ---- 6. the smaller ones ------------------------------------------------------------------------


def test_a_min_exit_layer_beyond_the_model_is_refused():
    policy = PolicyConfig(batching="shrink", min_exit_layer=8)
    with pytest.raises(PolicyConfigError, match="no exit point in a model of 8 layers"):
        build_policies(policy, num_layers=8)
    build_policies(policy, num_layers=9)
    build_policies(PolicyConfig(min_exit_layer=8), num_layers=8)  # full never exits: no matter
    result = _eetb("simulate", "--trace", str(SAMPLE), "--workload", "poisson:rate=4,n=4",
                   "--batching", "shrink", "--min-exit-layer", "12")  # fmt: skip
    _one_line_exit_2(result, "min exit layer 12")


def test_mooncake_lengths_beyond_any_context_are_refused(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 1e30, "output_length": 4}\n')
    with pytest.raises(Exception, match="input_length 1e\\+30 is over 10,000,000 tokens"):
        read_mooncake_jsonl(path)


def test_mooncake_out_of_order_timestamps_are_sorted_with_a_note(tmp_path, caplog):
    path = tmp_path / "m.jsonl"
    rows = [(0, 10), (2000, 20), (1000, 30)]
    path.write_text("".join(json.dumps({"timestamp": t, "input_length": n, "output_length": 1})
                            + "\n" for t, n in rows))  # fmt: skip
    with caplog.at_level(logging.WARNING):
        specs = read_mooncake_jsonl(path)
    assert [s.num_prompt_tokens for s in specs] == [10, 30, 20]
    assert "1 of 3 requests are out of arrival order" in caplog.text


def test_a_number_parameter_given_text_names_the_parameter():
    with pytest.raises(PolicyConfigError, match="quorum'?: fraction must be a number, got 'abc'"):
        create("batching", "quorum", fraction="abc")
    create("batching", "quorum", fraction=1)  # an int is a fine float


def test_the_trace_readme_names_the_schema_version_this_eetb_reads():
    header = (REPO / "traces" / "README.md").read_text().splitlines()[0]
    assert header == f"# Trace captures (schema version {SCHEMA_VERSION})"


def test_output_cut_short_by_a_closed_pipe_is_not_a_traceback():
    proc = subprocess.Popen([sys.executable, "-m", "testbed.cli", "trace", "info", str(SAMPLE)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    proc.stdout.close()  # the reader (`| head`) is gone before eetb writes
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err, err
