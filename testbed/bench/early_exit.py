"""``--suite early-exit``: a grid of batching × rule × λ on data-set prompts against ``full`` in
the same run: speedup, the ideal speedup of the layers saved, ROUGE-L and agreement."""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from testbed.bench.options import BenchOptions, Progress, Say
from testbed.bench.throughput import kv_cache_mb_for
from testbed.capture_records import EngineConfig, RequestOutput
from testbed.core import SchedulerConfig
from testbed.core.policy_set import PolicyConfig
from testbed.datasets import load_summaries
from testbed.engine.engine import LLMEngine
from testbed.engine.sampler import SamplingParams
from testbed.errors import ConfigError
from testbed.model.checkpoint import Checkpoint
from testbed.model.config import LlamaConfig
from testbed.quality import rouge, token_agreement
from testbed.runinfo import to_jsonable, write_run_info


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


# the early-exit grid: (batching, params) × rule × λ; each rule's λ spans "rarely" to "often"
GRID_BATCHING = (
    ("consensus", ()),
    ("quorum", (("fraction", 0.75),)),
    ("shrink", ()),
    ("rebatch", ()),
)
# per rule: (λ, first exit layer as a fraction of the depth); a model's first layers agree with
# the last rarely (the built-in model's about half the tokens), so most points start exiting at
# half or five eighths of the depth (layers 4 and 5 of the built-in model's 8)
GRID_THRESHOLDS = {
    "hidden": ((0.98, 0.0), (0.95, 0.0), (0.95, 0.5), (0.9, 0.5), (0.9, 0.625), (0.85, 0.625)),
    "softmax": ((0.7, 0.0), (0.5, 0.5)),
    "classifier": ((0.9, 0.0), (0.7, 0.5), (0.5, 0.625)),
}
GRID_FILLS = ("copy",)
ARTICLE_CHARS = 1200  # about 250-300 tokens: the built-in model was trained on 400-token heads


def parse_points(text: str) -> list[tuple[str, float, int]]:
    """'RULE:λ:FIRST_LAYER,...' → (rule, λ, first exit layer) per grid point."""
    points = []
    for item in text.split(","):
        parts = item.split(":")
        try:
            rule, lam, layer = parts[0], float(parts[1]), int(parts[2])
        except (IndexError, ValueError) as exc:
            raise ConfigError(f"--points: {item!r} is not RULE:λ:FIRST_LAYER") from exc
        points.append((rule, lam, layer))
    return points


def policy_grid(
    rules: list[str],
    fills: list[str],
    num_layers: int,
    batchings: list[str] | None = None,
    points: list[tuple[str, float, int]] | None = None,
) -> list[PolicyConfig]:
    """`full`, then batching × fill × point; the points default to GRID_THRESHOLDS of rules."""
    if points is None:
        unknown = [r for r in rules if r not in GRID_THRESHOLDS]
        if unknown:
            raise ConfigError(
                f"--rules: unknown rule {unknown[0]!r} (known: {', '.join(GRID_THRESHOLDS)})"
            )
        points = [(rule, lam, max(1, round(depth * num_layers)))
                  for rule in rules for lam, depth in GRID_THRESHOLDS[rule]]  # fmt: skip
    grid = [PolicyConfig()]
    chosen = [b for b in GRID_BATCHING if batchings is None or b[0] in batchings]
    for (batching, params), fill in itertools.product(chosen, fills):
        for rule, lam, min_layer in points:
            grid.append(PolicyConfig(batching=batching, batching_params=params, exit_rule=rule,
                                     threshold=lam, min_exit_layer=min_layer, kv_fill=fill))  # fmt: skip
    return grid


def run(
    opts: BenchOptions, ckpt: Checkpoint, say: Say = print, progress: Progress | None = None
) -> list[EarlyExitRow]:
    """`full`, the grid, `full` again, on summarisation prompts of a data set."""
    batchings = None if opts.batchings is None else opts.batchings.split(",")
    points = None if opts.points is None else parse_points(opts.points)
    # a bad grid fails before any data is read
    grid = policy_grid(opts.rules.split(","), opts.fills.split(","), ckpt.config.num_hidden_layers,
                       batchings, points)  # fmt: skip
    n = opts.num_requests or 32
    examples = load_summaries(opts.dataset, "eval", opts.data_dir)[:n]
    prompts = [ckpt.prompt.summary_request(ex.article[:ARTICLE_CHARS], opts.dataset)
               for ex in examples]  # fmt: skip
    params = SamplingParams(max_tokens=opts.max_new_tokens or 64)
    rows, outs = [], []
    references = [ex.reference for ex in examples]
    # `full` runs first and again last; its faster run is the baseline, so a noisy neighbour
    # during one of them cannot inflate every speedup
    for i, policy in enumerate([*grid, grid[0]]):
        row, out = run_policy(ckpt, prompts, references, policy, params, n,
                              device=opts.device, dtype=opts.dtype)  # fmt: skip
        rows.append(row)
        outs.append(out)
        if progress is not None:
            progress("early-exit", i + 1, len(grid) + 1, policy.label())
    last, last_out = rows.pop(), outs.pop()
    if last.wall_s < rows[0].wall_s:
        rows[0], outs[0] = last, last_out
    rows = relative_to_full(
        rows, outs, kv_only_cost_fraction(ckpt.config), lm_head_cost_layers(ckpt.config)
    )
    header = (f"{'configuration':44s} {'tok/s':>7s} {'speedup':>7s} {'ideal':>6s} {'ach/ideal':>9s} "
              f"{'layers':>6s} {'ROUGE-L':>7s} {'agree':>6s}")  # fmt: skip
    say(header)
    for r in rows:
        say(f"{r.label:44s} {r.tokens_per_s:7.1f} {r.speedup:6.2f}x {r.ideal_speedup:5.2f}x "
              f"{r.speedup / r.ideal_speedup:9.2f} {r.mean_exit_layer:6.2f} {r.rouge_l:7.4f} "
              f"{r.agreement:6.1%}")  # fmt: skip
    full_rouge = rows[0].rouge_l
    ok = [r for r in rows[1:] if r.rouge_l >= full_rouge - 0.01]
    if ok:
        best = max(ok, key=lambda r: r.speedup)
        say(f"best within 1 ROUGE-L point of full: {best.label} at {best.speedup:.2f}x "
              f"(ideal {best.ideal_speedup:.2f}x, achieved/ideal {best.speedup / best.ideal_speedup:.2f})")  # fmt: skip
    write_run_info(opts.out, {"grid": [p.label() for p in grid]}, seed=0, suite="early-exit")
    (opts.out / "early_exit.json").write_text(json.dumps(to_jsonable(rows), indent=2) + "\n")
    return 0
