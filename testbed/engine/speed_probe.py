"""A short fixed workload that tells how fast the machine is right now.

A shared machine's speed wanders by tens of percent over seconds to minutes (other tenants,
frequency changes). A validation compares a simulator, whose cost model was fitted on other runs,
with runs measured at whatever speed the machine had then. Timing this probe right before and
right after every run measures that speed beside the run, not from it: the run's own timings
never enter its prediction.
"""

from __future__ import annotations

import time

import numpy as np

from testbed.capture_records import EngineConfig
from testbed.engine.engine import LLMEngine
from testbed.engine.kv_cache import kv_mb_for_tokens
from testbed.engine.sampler import SamplingParams
from testbed.model.checkpoint import Checkpoint

PROBE_SEED = 1234  # fixed: every probe of every run feeds the same tokens


class SpeedProbe:
    """Offline generation of ``num_prompts`` prompts of ``prompt_tokens`` tokens and
    ``new_tokens`` tokens each at full depth: one prefill-heavy step, then decode steps, the mix
    a served run has. About 0.1 s for the built-in model on two CPU cores."""

    def __init__(
        self, ckpt: Checkpoint, *, num_prompts: int = 12, prompt_tokens: int = 48,
        new_tokens: int = 6, device: str = "auto", dtype: str = "float32",
    ) -> None:  # fmt: skip
        rng = np.random.default_rng(PROBE_SEED)
        vocab = ckpt.config.vocab_size
        self.prompts = [rng.integers(3, vocab, prompt_tokens).tolist() for _ in range(num_prompts)]
        self.params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
        # a cache of its own, reused, that holds every sequence at once: one too small (8 MB held
        # 177 of SmolLM2's tokens) runs the probe a few sequences at a time, 5 s a probe
        need_mb = 1.25 * kv_mb_for_tokens(ckpt.config, num_prompts * (prompt_tokens + new_tokens))
        self.engine = LLMEngine(
            ckpt, EngineConfig(kv_cache_mb=max(8.0, need_mb), device=device, dtype=dtype)
        )

    def measure_s(self) -> float:
        """Seconds the probe took now."""
        start = time.perf_counter()
        self.engine.generate(self.prompts, self.params)
        return time.perf_counter() - start
