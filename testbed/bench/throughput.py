"""``--suite throughput``: full-depth output tokens/s of the native engine against transformers'
``generate`` on static batches, same checkpoint, prompts and lengths (and vLLM when installed)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from testbed.bench.options import BenchOptions, Say
from testbed.capture_records import EngineConfig
from testbed.core import SchedulerConfig
from testbed.engine.device import resolve_device, resolve_dtype, synchronize
from testbed.engine.engine import LLMEngine
from testbed.engine.kv_cache import kv_mb_for_tokens
from testbed.engine.sampler import SamplingParams
from testbed.model.checkpoint import Checkpoint
from testbed.model.config import LlamaConfig
from testbed.runinfo import to_jsonable, write_run_info

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThroughputConfig:
    num_requests: int = 64
    min_prompt_tokens: int = 64
    max_prompt_tokens: int = 512
    max_new_tokens: int = 128
    hf_batch_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    seed: int = 0
    device: str = "auto"  # the native engine's and transformers' (see testbed.engine.device)
    dtype: str = "float32"


@dataclass(frozen=True)
class ThroughputRow:
    system: str
    num_output_tokens: int
    wall_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.num_output_tokens / self.wall_s


def kv_cache_mb_for(cfg: LlamaConfig, num_tokens: int) -> float:
    """K/V memory (float32) for num_tokens positions in every layer, at least 256 MB."""
    return max(256.0, kv_mb_for_tokens(cfg, num_tokens))


def random_prompts(cfg: ThroughputConfig, vocab_size: int) -> list[list[int]]:
    rng = np.random.default_rng(cfg.seed)
    lengths = rng.integers(cfg.min_prompt_tokens, cfg.max_prompt_tokens + 1, cfg.num_requests)
    return [rng.integers(3, vocab_size, n).tolist() for n in lengths]


def run_engine(ckpt: Checkpoint, prompts, cfg: ThroughputConfig) -> ThroughputRow:
    sched = SchedulerConfig(
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        max_model_len=ckpt.config.max_position_embeddings,
    )
    need = min(cfg.num_requests, cfg.max_num_seqs) * (cfg.max_prompt_tokens + cfg.max_new_tokens)
    kv_mb = max(512.0, kv_cache_mb_for(ckpt.config, need))  # no preemption: time the model
    engine = LLMEngine(ckpt, EngineConfig(scheduler=sched, kv_cache_mb=kv_mb,
                                          device=cfg.device, dtype=cfg.dtype))  # fmt: skip
    params = SamplingParams(max_tokens=cfg.max_new_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    wall = time.perf_counter() - start
    return ThroughputRow("eetb engine", sum(len(o.token_ids) for o in outs), wall)


@torch.inference_mode()
def run_transformers(ckpt: Checkpoint, prompts, cfg: ThroughputConfig) -> ThroughputRow:
    import transformers  # noqa: PLC0415  (an optional comparison, not a dependency)

    device = resolve_device(cfg.device)
    hf = transformers.LlamaForCausalLM.from_pretrained(ckpt.path, dtype=resolve_dtype(cfg.dtype))
    hf = hf.eval().to(device)
    total, start = 0, time.perf_counter()
    for i in range(0, len(prompts), cfg.hf_batch_size):
        chunk = prompts[i : i + cfg.hf_batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)  # left pad
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        out = hf.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=cfg.max_new_tokens,
            min_new_tokens=cfg.max_new_tokens, do_sample=False, pad_token_id=0,
        )  # fmt: skip
        total += (out.shape[1] - width) * len(chunk)
    synchronize(device)
    return ThroughputRow(
        f"transformers (static {cfg.hf_batch_size})", total, time.perf_counter() - start
    )


def run_vllm(ckpt: Checkpoint, prompts, cfg: ThroughputConfig) -> ThroughputRow | None:
    if importlib.util.find_spec("vllm") is None:
        return None
    import vllm  # noqa: PLC0415  (optional third column)

    # the plugin's architecture (full depth runs vLLM's own Llama forward): stock vLLM refuses a
    # checkpoint directory that also holds exit_heads.safetensors
    llm = vllm.LLM(model=str(ckpt.path), enforce_eager=True, dtype="float32", seed=cfg.seed,
                   hf_overrides={"architectures": ["EarlyExitLlamaForCausalLM"]})  # fmt: skip
    params = vllm.SamplingParams(max_tokens=cfg.max_new_tokens, ignore_eos=True, temperature=0)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    wall = time.perf_counter() - start
    return ThroughputRow("vllm", sum(len(o.outputs[0].token_ids) for o in outs), wall)


def run(opts: BenchOptions, ckpt: Checkpoint, say: Say = print) -> list[ThroughputRow]:
    """transformers' generate, the native engine and vLLM (when installed), full depth, on the
    same random prompts."""
    cfg = ThroughputConfig(device=opts.device, dtype=opts.dtype)
    if opts.num_requests:
        cfg = dataclasses.replace(cfg, num_requests=opts.num_requests)
    if opts.max_new_tokens:
        cfg = dataclasses.replace(cfg, max_new_tokens=opts.max_new_tokens)
    prompts = random_prompts(cfg, ckpt.config.vocab_size)
    rows = [run_transformers(ckpt, prompts, cfg), run_engine(ckpt, prompts, cfg)]
    vllm_row = run_vllm(ckpt, prompts, cfg)
    if vllm_row is not None:
        rows.append(vllm_row)
    base = rows[0].tokens_per_s
    say(f"{'system':28s} {'tokens':>8s} {'wall s':>8s} {'tok/s':>8s} {'vs transformers':>16s}")
    for r in rows:
        say(f"{r.system:28s} {r.num_output_tokens:8d} {r.wall_s:8.2f} {r.tokens_per_s:8.1f} "
              f"{r.tokens_per_s / base:15.2f}x")  # fmt: skip
    write_run_info(opts.out, cfg, seed=cfg.seed, suite="throughput")
    record = [dict(to_jsonable(r), tokens_per_s=r.tokens_per_s) for r in rows]
    (opts.out / "throughput.json").write_text(json.dumps(record, indent=2) + "\n")
    return rows
