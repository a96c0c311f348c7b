"""``eetb bench --suite vllm``: early exit inside vLLM against vLLM at full depth, and vLLM
against the native engine at full depth, on the same prompts in one process."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import vllm

from testbed.core.policy_set import PolicyConfig
from testbed.model.checkpoint import read_config
from testbed.vllm_backend.engine import VllmEngineConfig, model_runner_call, start_llm
from testbed.vllm_backend.options import VllmEarlyExitConfig


@dataclass(frozen=True)
class VllmBenchRow:
    label: str
    num_output_tokens: int
    wall_s: float
    mean_exit_layer: float  # decode tokens (the first token comes from the prefill)
    mean_executed_layers: float  # full layers computed per decode token

    @property
    def tokens_per_s(self) -> float:
        return self.num_output_tokens / self.wall_s


def run_vllm_policy(
    ckpt_dir: Path, prompts: list[list[int]], policy: PolicyConfig, *, max_new_tokens: int,
    max_num_seqs: int,
) -> VllmBenchRow:  # fmt: skip
    """Greedy generation of every prompt at once. Full depth runs vLLM's own Llama forward;
    early exit records what each step ran (the layers per token)."""
    is_full = policy.batching == "full"
    settings = VllmEarlyExitConfig(policy, record="off" if is_full else "live")
    llm = start_llm(ckpt_dir, settings, VllmEngineConfig(max_num_seqs=max_num_seqs))
    params = vllm.SamplingParams(max_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], params, use_tqdm=False)  # warm
    model_runner_call(llm, lambda r: r.model.drain_records())
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    wall = time.perf_counter() - start
    rows = [
        row
        for rec in model_runner_call(llm, lambda r: r.model.drain_records())
        for row in rec.rows
        if row.is_decode
    ]
    num_layers = read_config(ckpt_dir).num_hidden_layers
    return VllmBenchRow(
        label=f"vllm {policy.label()}",
        num_output_tokens=sum(len(o.outputs[0].token_ids) for o in outs),
        wall_s=wall,
        mean_exit_layer=float(np.mean([r.exit_layer for r in rows])) if rows else num_layers,
        mean_executed_layers=(
            float(np.mean([r.executed_layers for r in rows])) if rows else num_layers
        ),
    )
