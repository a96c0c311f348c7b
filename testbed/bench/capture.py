"""``--suite capture``: oracle captures against plain full-depth generation of the same
requests, alternating, three times each; the ratios of the best times. Two oracles: one of every
layer (any exit point replays) and one of a few exit points (half the depth, then every third
layer by default), which pays an LM head at those layers only."""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

from testbed.bench.options import BenchOptions, Say
from testbed.bench.throughput import ThroughputConfig, random_prompts
from testbed.capture_records import CaptureConfig, CaptureRequest, EngineConfig
from testbed.core import SchedulerConfig
from testbed.core.policy_set import PolicyConfig
from testbed.engine.capture import run_capture
from testbed.engine.engine import LLMEngine
from testbed.engine.sampler import SamplingParams
from testbed.model.checkpoint import Checkpoint
from testbed.runinfo import write_run_info


def run(opts: BenchOptions, ckpt: Checkpoint, say: Say = print) -> dict[str, list[float]]:
    """Oracle capture against plain full-depth generation of the same requests, alternating."""
    cfg = ThroughputConfig(
        num_requests=opts.num_requests or 32, max_prompt_tokens=256,
        max_new_tokens=opts.max_new_tokens or 64,
    )  # fmt: skip
    prompts = random_prompts(cfg, ckpt.config.vocab_size)
    requests = [CaptureRequest(i, 0.0, tuple(p), cfg.max_new_tokens) for i, p in enumerate(prompts)]
    num_layers = ckpt.config.num_hidden_layers
    points = PolicyConfig(min_exit_layer=opts.min_exit_layer or max(1, num_layers // 2),
                          exit_stride=opts.exit_stride or 3)  # fmt: skip
    engine_cfg = EngineConfig(scheduler=SchedulerConfig(max_num_seqs=cfg.max_num_seqs),
                              device=opts.device, dtype=opts.dtype)  # fmt: skip
    sparse_cfg = CaptureConfig(mode="oracle", engine=replace(engine_cfg, policy=points))
    layers = sparse_cfg.recorded_layers(num_layers)[:-1]
    sparse = f"oracle at {len(layers)} exit points"
    arms = {"oracle, every layer": CaptureConfig(mode="oracle", engine=engine_cfg),
            sparse: sparse_cfg}  # fmt: skip
    say(f"{sparse}: layers {', '.join(map(str, layers))} (and the last, {num_layers})")
    times = {"plain": [], **{name: [] for name in arms}}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(3):
            start = time.perf_counter()
            LLMEngine(ckpt, engine_cfg).run(
                [
                    (0.0, r.prompt_token_ids, SamplingParams(max_tokens=r.max_tokens))
                    for r in requests
                ]
            )
            times["plain"].append(time.perf_counter() - start)
            for k, (name, capture_cfg) in enumerate(arms.items()):
                start = time.perf_counter()
                run_capture(ckpt, requests, capture_cfg, Path(tmp) / f"c{rep}-{k}")
                times[name].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in times.items()}
    for k, v in times.items():
        say(f"{k:28s} best {best[k]:6.2f} s   runs {', '.join(f'{x:.2f}' for x in v)}")
    ratios = {name: best[name] / best["plain"] for name in arms}
    for name, ratio in ratios.items():
        say(f"{name} / plain full-depth generation: {ratio:.2f}x")
    write_run_info(opts.out, cfg, seed=cfg.seed, suite="capture", times_s=times, ratios=ratios,
                   sparse_layers=list(layers))  # fmt: skip
    return times
