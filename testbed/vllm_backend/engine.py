"""Starting vLLM on an eetb checkpoint with the early-exit model and the settings it needs."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import vllm

from testbed.core.policy_set import build_policies
from testbed.vllm_backend.options import VllmEarlyExitConfig, to_overrides

# In-process engine core (the capture reads the model after each step), a small CPU KV cache,
# and model runner V1: the capture names each forward row's request from its persistent
# `input_batch`, which the V2 runner (vLLM's default on GPUs) does not keep between steps. A
# user's own settings win.
ENV_DEFAULTS = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_USE_V2_MODEL_RUNNER": "0",
}


@dataclass(frozen=True)
class VllmEngineConfig:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 4096
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    dtype: str = "float32"
    seed: int = 0


def engine_kwargs(
    ckpt_dir: Path, settings: VllmEarlyExitConfig, cfg: VllmEngineConfig
) -> dict[str, Any]:
    """Arguments of ``vllm.LLM`` for the early-exit model (also the stock model's, less the
    overrides). Eager, no prefix caching, synchronous scheduling: see docs/vllm.md."""
    return {
        "model": str(ckpt_dir),
        "hf_overrides": to_overrides(settings),
        "enforce_eager": True,
        "enable_prefix_caching": False,
        "async_scheduling": False,
        "dtype": cfg.dtype,
        "seed": cfg.seed,
        "max_num_seqs": cfg.max_num_seqs,
        "max_num_batched_tokens": cfg.max_num_batched_tokens,
        "max_model_len": cfg.max_model_len,
    }


def start_llm(ckpt_dir: Path, settings: VllmEarlyExitConfig, cfg: VllmEngineConfig) -> vllm.LLM:
    # depth checks before vLLM starts: an error inside its model constructor arrives wrapped
    config = json.loads((Path(ckpt_dir) / "config.json").read_text())
    build_policies(settings.policy, num_layers=int(config["num_hidden_layers"]))
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    return vllm.LLM(**engine_kwargs(ckpt_dir, settings, cfg))


def model_runner_call(llm: vllm.LLM, func) -> Any:
    """Run ``func(model_runner)`` on the (single) worker and return its result."""

    def on_worker(worker):
        return func(getattr(worker, "worker", worker).model_runner)

    return llm.llm_engine.collective_rpc(on_worker)[0]
