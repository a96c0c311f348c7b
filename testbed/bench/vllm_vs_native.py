"""``--suite vllm``: vLLM early exit against vLLM full depth, and vLLM against the native
engine, both at full depth, on the same random prompts."""

from __future__ import annotations

import dataclasses
import importlib.util

from testbed.bench.options import BenchOptions, Say
from testbed.bench.throughput import ThroughputConfig, random_prompts, run_engine
from testbed.core.policy_set import PolicyConfig
from testbed.errors import ConfigError
from testbed.model.checkpoint import Checkpoint
from testbed.runinfo import write_run_info

# vLLM early exit vs vLLM full depth, and vLLM vs the native engine, both at full depth; the
# first exit layer is half the depth unless --min-exit-layer says otherwise (4 of the built-in 8)
VLLM_EARLY_EXIT = PolicyConfig(batching="consensus", exit_rule="hidden", threshold=0.9)


def early_exit_policy(opts: BenchOptions, num_layers: int) -> PolicyConfig:
    return dataclasses.replace(
        VLLM_EARLY_EXIT,
        exit_rule=opts.rule or VLLM_EARLY_EXIT.exit_rule,
        threshold=VLLM_EARLY_EXIT.threshold if opts.threshold is None else opts.threshold,
        min_exit_layer=opts.min_exit_layer or max(1, num_layers // 2),
    )


def run(opts: BenchOptions, ckpt: Checkpoint, say: Say = print) -> dict[str, float]:
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("--suite vllm needs vLLM installed (docs/vllm.md)")
    # vLLM is optional: the suite's module imports it
    from testbed.vllm_backend.bench import run_vllm_policy  # noqa: PLC0415

    cfg = ThroughputConfig(num_requests=opts.num_requests or 32, max_prompt_tokens=256,
                           max_new_tokens=opts.max_new_tokens or 64, max_num_seqs=32,
                           device=opts.device, dtype=opts.dtype)  # fmt: skip
    prompts = random_prompts(cfg, ckpt.config.vocab_size)
    early_policy = early_exit_policy(opts, ckpt.config.num_hidden_layers)
    native = run_engine(ckpt, prompts, cfg)
    full, early = (
        run_vllm_policy(
            ckpt.path,
            prompts,
            policy,
            max_new_tokens=cfg.max_new_tokens,
            max_num_seqs=cfg.max_num_seqs,
        )  # fmt: skip
        for policy in (PolicyConfig(), early_policy)
    )
    say(f"{'system':40s} {'tokens':>7s} {'wall s':>7s} {'tok/s':>7s} {'exit':>5s} {'layers':>6s}")
    say(f"{native.system:40s} {native.num_output_tokens:7d} {native.wall_s:7.2f} "
          f"{native.tokens_per_s:7.1f} {'':>5s} {ckpt.config.num_hidden_layers:6d}")  # fmt: skip
    for r in (full, early):
        say(f"{r.label:40s} {r.num_output_tokens:7d} {r.wall_s:7.2f} {r.tokens_per_s:7.1f} "
              f"{r.mean_exit_layer:5.2f} {r.mean_executed_layers:6.2f}")  # fmt: skip
    ratio_ee = early.tokens_per_s / full.tokens_per_s
    ratio_native = full.tokens_per_s / native.tokens_per_s
    say(
        f"vLLM early exit / vLLM full: {ratio_ee:.2f}x throughput, "
        f"{early.mean_executed_layers:.2f} of {full.mean_executed_layers:.2f} layers per token"
    )
    say(f"vLLM full / native full: {ratio_native:.2f}x throughput")  # fmt: skip
    write_run_info(opts.out, cfg, seed=cfg.seed, suite="vllm", policy=early_policy.label(),
                   ratio_early_exit=ratio_ee, ratio_vllm_native=ratio_native)  # fmt: skip
    return {"early_exit_over_full": ratio_ee, "vllm_over_native": ratio_native}
