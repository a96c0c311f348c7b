"""``--suite capture``: an oracle capture against plain full-depth generation of the same
requests, alternating, three times each; the ratio of the best times."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from testbed.bench.options import BenchOptions, Say
from testbed.bench.throughput import ThroughputConfig, random_prompts
from testbed.capture_records import CaptureConfig, CaptureRequest, EngineConfig
from testbed.core import SchedulerConfig
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
    engine_cfg = EngineConfig(scheduler=SchedulerConfig(max_num_seqs=cfg.max_num_seqs),
                              device=opts.device, dtype=opts.dtype)  # fmt: skip
    times = {"plain": [], "oracle capture": []}
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
            start = time.perf_counter()
            run_capture(
                ckpt,
                requests,
                CaptureConfig(mode="oracle", engine=engine_cfg),
                Path(tmp) / f"c{rep}",
            )
            times["oracle capture"].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in times.items()}
    for k, v in times.items():
        say(f"{k:16s} best {best[k]:6.2f} s   runs {', '.join(f'{x:.2f}' for x in v)}")
    ratio = best["oracle capture"] / best["plain"]
    say(f"oracle capture / plain full-depth generation: {ratio:.2f}x")
    write_run_info(opts.out, cfg, seed=cfg.seed, suite="capture", times_s=times, ratio=ratio)
    return times
