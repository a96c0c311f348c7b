"""Capture a trace from a live run of the native engine (``eetb capture``)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from testbed.capture_records import (
    CaptureConfig,
    CaptureRequest,
    EngineConfig,
    RequestOutput,
    oracle_policy,
)
from testbed.core import SchedulerConfig
from testbed.datasets import load_summaries
from testbed.engine.engine import LLMEngine, StepHook
from testbed.engine.recorder import TraceProbe, TraceRecorder
from testbed.engine.sampler import SamplingParams
from testbed.model.checkpoint import Checkpoint, checkpoint_hash
from testbed.runinfo import git_commit, to_jsonable
from testbed.trace import CaptureWriter
from testbed.workload.lengths import workload_lengths
from testbed.workload.prompts import attach_prompts, synthetic_prompts


def capture_meta(ckpt: Checkpoint, cfg: CaptureConfig, device: str = "cpu",
                 num_kv_blocks: int | None = None) -> dict[str, Any]:  # fmt: skip
    model_cfg = ckpt.config
    return {
        "mode": cfg.mode,
        "model": {
            "config": to_jsonable(model_cfg),
            "num_layers": model_cfg.num_hidden_layers,
            "checkpoint_hash": checkpoint_hash(ckpt.path),
            "name": ckpt.path.name,
        },
        "engine": {"name": "native", "version": importlib.metadata.version("eetb")},
        "device": device,  # the engine's, resolved (auto never appears here)
        "dtype": cfg.engine.dtype,
        "policy": to_jsonable(cfg.engine.policy),
        "scheduler": to_jsonable(cfg.engine.scheduler),
        "block_size": cfg.engine.block_size,
        "num_kv_blocks": num_kv_blocks,  # what kv_cache_mb held (a simulation of it needs them)
        "oracle_layers": cfg.recorded_layers(model_cfg.num_hidden_layers),
        "kv_cache_mb": cfg.engine.kv_cache_mb,
        "workload": cfg.workload,
        "seed": cfg.seed,
        "git_commit": git_commit(),
    }


def run_capture(
    ckpt: Checkpoint,
    requests: Sequence[CaptureRequest],
    cfg: CaptureConfig,
    out: Path,
    on_finish: Callable[[RequestOutput], None] | None = None,
    on_step: StepHook | None = None,
) -> Path:
    """Run the workload arrival-paced and write the capture directory ``out``."""
    engine_cfg = cfg.engine
    layers = cfg.recorded_layers(ckpt.config.num_hidden_layers)  # checks the points first
    if cfg.mode == "oracle":  # full depth: the recorded token stream is the full-depth one
        engine_cfg = dataclasses.replace(engine_cfg, policy=oracle_policy(engine_cfg.policy))
    engine = LLMEngine(ckpt, dataclasses.replace(engine_cfg, seed=cfg.seed))
    probe = TraceProbe(engine.runner.model, engine.runner.exit_heads, is_oracle=cfg.mode == "oracle",
                       profile_layers=cfg.profile_layers, oracle_layers=tuple(layers or ()))  # fmt: skip
    engine.runner.probe = probe
    # the engine numbers sequences 0, 1, ... in the order they arrive
    order = sorted(requests, key=lambda r: (r.arrival_s, r.request_id))
    request_ids = {seq_id: r.request_id for seq_id, r in enumerate(order)}
    with CaptureWriter(
        out,
        capture_meta(
            ckpt,
            dataclasses.replace(cfg, engine=engine_cfg),
            str(engine.device),
            engine.block_manager.num_blocks,
        ),
    ) as writer:
        limits = {seq_id: r.max_tokens for seq_id, r in enumerate(order)}
        recorder = TraceRecorder(writer, probe, engine.num_layers, request_ids, limits)
        engine.step_hooks.append(recorder.on_step)
        if on_step is not None:
            engine.step_hooks.append(on_step)

        def finished(o: RequestOutput) -> None:
            recorder.on_finish(o)
            if on_finish is not None:
                on_finish(o)

        engine.run(
            [
                (
                    r.arrival_s,
                    r.prompt_token_ids,
                    SamplingParams(max_tokens=r.max_tokens, ignore_eos=r.ignore_eos),
                )
                for r in order
            ],
            on_finish=finished,
        )
    return out


SELF_PROMPTS = "self"  # a dataset name: prompts the model samples itself (no data set needed)


def build_requests(
    workload: str, dataset: str, ckpt: Checkpoint, *, seed: int, data_dir: str | None
) -> tuple[list[CaptureRequest], int]:
    """Requests of a workload string with prompts cut from a data set's evaluation articles to
    the exact lengths ('synthetic': random token ids; 'self': text the model samples from its
    own distribution); returns them and how many were clipped."""
    max_len = min(SchedulerConfig().max_model_len, ckpt.config.max_position_embeddings)
    lengths, report = workload_lengths(
        workload, seed=seed, max_model_len=max_len, data_dir=data_dir
    )
    if dataset == "synthetic":
        reqs = synthetic_prompts(lengths, ckpt.config.vocab_size, seed)
    elif dataset == SELF_PROMPTS:
        reqs = synthetic_prompts(lengths, ckpt.config.vocab_size, seed)
        reqs = [dataclasses.replace(r, prompt_token_ids=p)
                for r, p in zip(reqs, self_prompts(ckpt, [len(r.prompt_token_ids) for r in reqs], seed),
                                strict=True)]  # fmt: skip
    else:
        texts = [ex.article for ex in load_summaries(dataset, "eval", data_dir)]
        bos = ckpt.config.bos_token_id

        def encode(text: str) -> list[int]:
            return ([bos] if bos is not None else []) + ckpt.tokenizer.encode(text).ids

        reqs = attach_prompts(lengths, texts, encode, seed=seed)
    out = [
        CaptureRequest(
            r.request_id,
            r.arrival_s,
            tuple(r.prompt_token_ids),
            r.max_tokens,
            r.source_index,
            r.ignore_eos,
        )
        for r in reqs
    ]
    return out, report.num_requests_clipped


def self_prompts(ckpt: Checkpoint, lengths: Sequence[int], seed: int) -> list[tuple[int, ...]]:
    """Prompts of exactly these lengths sampled from the model (temperature 1, seeded), each
    starting at BOS: in-distribution text for a demo that has no data set."""
    bos = ckpt.config.bos_token_id if ckpt.config.bos_token_id is not None else 0
    engine = LLMEngine(ckpt, EngineConfig(seed=seed))
    ids = [
        engine.add_request([bos], SamplingParams(max_tokens=max(n - 1, 1), temperature=1.0,
                                                 ignore_eos=True))
        for n in lengths
    ]  # fmt: skip
    done: dict[int, list[int]] = {}
    while engine.has_unfinished():  # one batch: every prompt decodes side by side
        for out in engine.step():
            done[out.seq_id] = out.token_ids
    return [(bos, *done[i])[:n] for i, n in zip(ids, lengths, strict=True)]
