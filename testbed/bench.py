"""Benchmarks of the native engine, side by side in one process (ratios, not absolute times).

``throughput``: full-depth output tokens/s of the engine against transformers' ``generate`` on
static batches, same checkpoint, prompts and lengths (and vLLM when it is installed).
``early_exit``: a grid of policy × rule × λ on CNN/DM prompts against ``full`` in the same run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from testbed.capture_records import EngineConfig, RequestOutput
from testbed.core import SchedulerConfig
from testbed.core.policy_set import PolicyConfig
from testbed.engine.device import resolve_device, resolve_dtype, synchronize
from testbed.engine.engine import LLMEngine
from testbed.engine.sampler import SamplingParams
from testbed.model.checkpoint import Checkpoint
from testbed.model.config import LlamaConfig
from testbed.quality import rouge, token_agreement

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


def _layer_flops(cfg: LlamaConfig) -> int:
    """Multiply-adds of one decoder layer's projections per token."""
    d, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_size
    q_o = 2 * d * cfg.num_attention_heads * cfg.head_size
    return q_o + 2 * d * kv + 3 * d * cfg.intermediate_size


def kv_only_cost_fraction(cfg: LlamaConfig) -> float:
    """FLOPs of a K/V-only layer (K and V projections) over those of a full layer."""
    return 2 * cfg.hidden_size * cfg.num_key_value_heads * cfg.head_size / _layer_flops(cfg)


def lm_head_cost_layers(cfg: LlamaConfig) -> float:
    """FLOPs of the LM head for one token, in decoder layers: every output token pays it once,
    at whatever layer it exits (SmolLM2-135M's 49k-token head costs about 8 of its 30 layers)."""
    return cfg.vocab_size * cfg.hidden_size / _layer_flops(cfg)


def kv_cache_mb_for(cfg: LlamaConfig, num_tokens: int) -> float:
    """K/V memory (float32) for num_tokens positions in every layer, at least 256 MB."""
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_size * 4
    return max(256.0, num_tokens * per_token / 2**20)


@dataclass(frozen=True)
class EarlyExitRow:
    label: str
    wall_s: float
    num_output_tokens: int
    mean_exit_layer: float  # over decode tokens (the first token comes from the prefill)
    decode_row_layers: int  # executed row-layers of decode rows (prefill rows run every layer)
    kv_only_row_layers: int
    prefill_s: float  # step time apportioned to prefill tokens by their share of row-layers
    decode_s: float  # the rest of the step time
    rouge_l: float
    agreement: float = 0.0  # token agreement with the full-depth output
    speedup: float = 0.0  # tokens/s relative to full, same run
    ideal_speedup: float = 0.0  # if decode time scaled with the work done (see relative_to_full)

    @property
    def tokens_per_s(self) -> float:
        return self.num_output_tokens / self.wall_s


def run_policy(
    ckpt: Checkpoint,
    prompts: Sequence[str],
    references: Sequence[str],
    policy: PolicyConfig,
    params: SamplingParams,
    max_num_seqs: int,
    *,
    device: str = "auto",
    dtype: str = "float32",
) -> tuple[EarlyExitRow, list[RequestOutput]]:
    sched = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=4096)
    # room for every request at once: a preemption would time the cache, not the policy
    kv_mb = kv_cache_mb_for(ckpt.config, max_num_seqs * (ckpt.config.max_position_embeddings // 4))
    kv_mb = min(kv_mb, kv_cache_mb_for(ckpt.config, max_num_seqs * 1024))
    engine = LLMEngine(ckpt, EngineConfig(policy=policy, scheduler=sched, kv_cache_mb=kv_mb,
                                          device=device, dtype=dtype))  # fmt: skip
    L = engine.num_layers
    acc = {"decode_rl": 0, "kv": 0, "prefill_s": 0.0, "decode_s": 0.0}

    def hook(plan, result) -> None:
        prefill_rl = plan.num_prefill_tokens * L
        decode_rl = result.num_row_layers_executed - prefill_rl
        share = prefill_rl / max(1, result.num_row_layers_executed)
        acc["decode_rl"] += decode_rl
        acc["kv"] += result.num_kv_only_row_layers
        acc["prefill_s"] += share * result.duration_s
        acc["decode_s"] += (1 - share) * result.duration_s

    engine.step_hooks.append(hook)
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    wall = time.perf_counter() - start
    exits = [e for o in outs for e in o.exit_layers[1:]]  # the first token comes from prefill
    row = EarlyExitRow(
        label=policy.label(),
        wall_s=wall,
        num_output_tokens=sum(len(o.token_ids) for o in outs),
        mean_exit_layer=float(np.mean(exits)) if exits else float(L),
        decode_row_layers=acc["decode_rl"],
        kv_only_row_layers=acc["kv"],
        prefill_s=acc["prefill_s"],
        decode_s=acc["decode_s"],
        rouge_l=rouge([o.text.strip() for o in outs], list(references)).rougeL,
    )
    return row, outs


def relative_to_full(
    rows: list[EarlyExitRow],
    outs: list[list[RequestOutput]],
    fill_cost: float,
    head_cost: float = 0.0,
) -> list[EarlyExitRow]:
    """Speedup, ideal speedup and agreement against the first row, which must be ``full``.

    Ideal: the full run's prefill time, plus its decode time scaled by this run's decode work
    (executed row-layers + fill_cost × K/V-only row-layers + head_cost layers for each token's
    LM head, per output token) over full's. It is what the engine would reach if exit decisions,
    signals and fills cost nothing beyond that.
    """
    base, base_outs = rows[0], outs[0]
    base_work = base.decode_row_layers / base.num_output_tokens + head_cost
    done = []
    for row, o in zip(rows, outs, strict=True):
        work = (row.decode_row_layers + fill_cost * row.kv_only_row_layers) / row.num_output_tokens
        work += head_cost
        ideal_s = (base.prefill_s + base.decode_s * work / base_work) / base.num_output_tokens
        agree = np.mean(
            [token_agreement(a.token_ids, b.token_ids) for a, b in zip(o, base_outs, strict=True)]
        )
        done.append(
            dataclasses.replace(
                row,
                speedup=row.tokens_per_s / base.tokens_per_s,
                ideal_speedup=((base.prefill_s + base.decode_s) / base.num_output_tokens) / ideal_s,
                agreement=float(agree),
            )
        )
    return done


ProgressFn = Callable[[str, int, int, str], None]
