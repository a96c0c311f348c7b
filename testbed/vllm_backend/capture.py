"""Trace capture from vLLM (``eetb capture --engine vllm``): the native capture's schema.

The engine core runs in this process, so after each ``LLMEngine.step`` the capture reads the
model's record of that forward and the worker's batch order (``input_batch.req_ids``), which
names the request of every row. Arrival-paced on the real clock, like the native capture.
"""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import vllm
from vllm.platforms import current_platform

from testbed.capture_records import (
    CaptureConfig,
    CaptureRequest,
    RequestOutput,
    matches_final,
    oracle_policy,
)
from testbed.errors import ConfigError
from testbed.model.checkpoint import checkpoint_hash, read_config
from testbed.model.signals import SIGNAL_NAMES
from testbed.runinfo import git_commit, to_jsonable
from testbed.trace import CaptureWriter
from testbed.vllm_backend.engine import VllmEngineConfig, model_runner_call, start_llm
from testbed.vllm_backend.options import VllmEarlyExitConfig, check_supported
from testbed.vllm_backend.records import RowRecord, StepRecord, steps_row


@dataclass
class _Request:
    request: CaptureRequest
    output: RequestOutput
    num_seen: int = 0  # output tokens already written


@dataclass
class _Run:
    """State of one capture: requests by vLLM's external id, the clock, the writer."""

    writer: CaptureWriter
    num_layers: int
    is_oracle: bool
    start_s: float = field(default_factory=time.perf_counter)
    live: dict[str, _Request] = field(default_factory=dict)
    num_steps: int = 0

    def clock(self) -> float:
        return time.perf_counter() - self.start_s


def settings_for(cfg: CaptureConfig) -> VllmEarlyExitConfig:
    """Oracle captures run full depth and record every signal; live ones run the policy."""
    check_supported(cfg.engine.policy)  # a bad option is an error even where oracle ignores it
    if cfg.profile_layers:
        raise ConfigError("per-layer profiling (--profile) is not available with --engine vllm")
    if cfg.mode == "oracle":
        return VllmEarlyExitConfig(oracle_policy(cfg.engine.policy), record="oracle")
    return VllmEarlyExitConfig(cfg.engine.policy, record="live")


def engine_config_for(cfg: CaptureConfig) -> VllmEngineConfig:
    sched = cfg.engine.scheduler
    return VllmEngineConfig(
        max_num_seqs=sched.max_num_seqs,
        max_num_batched_tokens=sched.max_num_batched_tokens,
        seed=cfg.seed,
    )


def vllm_capture_meta(
    ckpt_dir: Path, cfg: CaptureConfig, settings: VllmEarlyExitConfig, cache_config=None
) -> dict[str, Any]:
    """``cache_config``: the running engine's vLLM CacheConfig, whose K/V blocks a simulation of
    this engine needs; None (a server in another process) records none."""
    model_cfg = read_config(ckpt_dir)
    engine_cfg = engine_config_for(cfg)
    return {
        "mode": cfg.mode,
        "model": {
            "config": to_jsonable(model_cfg),
            "num_layers": model_cfg.num_hidden_layers,
            "checkpoint_hash": checkpoint_hash(ckpt_dir),
            "name": Path(ckpt_dir).name,
        },
        "engine": {
            "name": "vllm",
            "version": vllm.__version__,
            "plugin": importlib.metadata.version("eetb"),
        },
        "device": "cpu" if current_platform.is_cpu() else "gpu",
        "dtype": engine_cfg.dtype,
        "policy": to_jsonable(settings.policy),
        "scheduler": to_jsonable(engine_cfg),
        # vLLM's own choices (CPU: blocks of 128 tokens in VLLM_CPU_KVCACHE_SPACE)
        "block_size": getattr(cache_config, "block_size", None),
        "num_kv_blocks": getattr(cache_config, "num_gpu_blocks", None),
        "kv_cache_mb": None,
        "oracle_layers": cfg.recorded_layers(model_cfg.num_hidden_layers),
        "workload": cfg.workload,
        "seed": cfg.seed,
        "git_commit": git_commit(),
    }


def run_vllm_capture(
    ckpt_dir: Path,
    requests: Sequence[CaptureRequest],
    cfg: CaptureConfig,
    out: Path,
    on_finish: Callable[[RequestOutput], None] | None = None,
) -> Path:
    """Run the workload arrival-paced on vLLM and write the capture directory ``out``."""
    settings = settings_for(cfg)
    llm = start_llm(Path(ckpt_dir), settings, engine_config_for(cfg))
    engine = llm.llm_engine
    order = sorted(requests, key=lambda r: (r.arrival_s, r.request_id))
    num_layers = read_config(ckpt_dir).num_hidden_layers
    meta = vllm_capture_meta(Path(ckpt_dir), cfg, settings, engine.vllm_config.cache_config)
    with CaptureWriter(out, meta) as writer:
        run = _Run(writer, num_layers, cfg.mode == "oracle")
        nxt = 0
        while nxt < len(order) or engine.has_unfinished_requests():
            while nxt < len(order) and order[nxt].arrival_s <= run.clock():
                _add(engine, run, order[nxt], seq_id=nxt)
                nxt += 1
            if not engine.has_unfinished_requests():
                time.sleep(max(0.0, min(0.01, order[nxt].arrival_s - run.clock())))
                continue
            # the engine core runs in this process (multiprocessing off), so process time
            # covers its work
            start_s, start_cpu_s = run.clock(), time.process_time()
            outputs = engine.step()
            times_s = (start_s, run.clock() - start_s, time.process_time() - start_cpu_s)
            req_ids, records = model_runner_call(llm, _batch_order_and_records)
            _write_step(run, times_s, req_ids, records, outputs, on_finish)
    return out


def _batch_order_and_records(runner) -> tuple[list[str], list]:
    batch = getattr(runner, "input_batch", None)
    if batch is None:
        raise ConfigError(
            f"vLLM's {type(runner).__name__} keeps no input_batch, so the capture cannot name the"
            " request of each row; run with VLLM_USE_V2_MODEL_RUNNER=0 (model runner V1)"
        )
    return list(batch.req_ids), runner.model.drain_records()


def _add(engine, run: _Run, request: CaptureRequest, *, seq_id: int) -> None:
    key = f"r{request.request_id}"
    params = vllm.SamplingParams(
        max_tokens=request.max_tokens, temperature=0.0, ignore_eos=request.ignore_eos
    )
    engine.add_request(key, {"prompt_token_ids": list(request.prompt_token_ids)}, params)
    output = RequestOutput(seq_id, request.prompt_token_ids, [], [], arrival_s=request.arrival_s)
    run.live[key] = _Request(request, output)


def _write_step(run: _Run, times_s, req_ids, records, outputs, on_finish) -> None:
    """Write one engine step; ``times_s`` is its (start, duration, CPU) seconds."""
    if not records:  # a step that ran no forward (e.g. only finished requests)
        return
    if len(records) != 1:
        raise AssertionError(f"one forward per engine step expected, got {len(records)}")
    record: StepRecord = records[0]
    if len(req_ids) != len(record.rows):
        raise AssertionError(f"{len(req_ids)} scheduled requests but {len(record.rows)} rows")
    rows = {
        req_id.rpartition("-")[0]: row for req_id, row in zip(req_ids, record.rows, strict=True)
    }
    start_s, duration_s, cpu_s = times_s
    run.writer.append("steps", steps_row(run.num_steps, start_s, duration_s, record, cpu_s))
    run.num_steps += 1
    now = run.clock()
    for out in outputs:
        state = run.live[out.request_id]
        tokens = list(out.outputs[0].token_ids)
        for token in tokens[state.num_seen :]:
            _write_token(run, state, rows[out.request_id], token, now)
        if out.finished:
            state.output.finish_s = now
            _write_request(run, state)
            del run.live[out.request_id]
            if on_finish is not None:
                on_finish(state.output)


def _write_token(run: _Run, state: _Request, row: RowRecord, token: int, now: float) -> None:
    position = state.num_seen
    expected = len(state.request.prompt_token_ids) + position - 1
    if row.position != expected:  # the row must be the one that produced this token
        raise AssertionError(f"request {state.request.request_id}: row at {row.position}, "
                             f"token {position} needs {expected}")  # fmt: skip
    exit_layer = row.exit_layer if row.is_decode else run.num_layers
    run.writer.append("tokens", {
        "request_id": state.request.request_id, "position": position, "token_id": token,
        "exit_layer": exit_layer, "is_forced": row.is_forced,
        "executed_layers": row.executed_layers, "filled_layers": row.filled_layers,
        **{name: row.signals.get(name) for name in SIGNAL_NAMES},
        "matches_final": matches_final(row.argmax, token),
    })  # fmt: skip
    state.num_seen += 1
    state.output.token_ids.append(token)
    state.output.exit_layers.append(exit_layer)
    if state.output.first_token_s is None:
        state.output.first_token_s = now


def _write_request(run: _Run, state: _Request) -> None:
    out = state.output
    run.writer.append("requests", {
        "request_id": state.request.request_id, "arrival_s": out.arrival_s,
        "num_prompt_tokens": len(out.prompt_token_ids), "num_output_tokens": len(out.token_ids),
        "max_tokens": state.request.max_tokens, "first_token_s": out.first_token_s,
        "finish_s": out.finish_s, "num_preemptions": 0,
    })  # fmt: skip
