"""``eetb train-exits``: data → cached hidden states → exit adapters → probes → held-out
agreement before and after → ``exit_heads.safetensors`` and its card (EXITS_CARD.md).

Held-out agreement is measured the way an oracle capture sees it: the engine writes greedy
full-depth summaries of evaluation articles the training never saw, then every layer's exit
token on those positions (teacher-forced) is compared with the final layer's token, once through
the model's own final norm (the logit lens, what a stock checkpoint runs) and once through the
trained adapters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from testbed.capture_records import EngineConfig
from testbed.datasets import SummaryExample, load_summaries
from testbed.engine.engine import LLMEngine
from testbed.engine.sampler import SamplingParams
from testbed.model.checkpoint import EXIT_HEADS_FILE, Checkpoint, checkpoint_hash, save_exit_heads
from testbed.model.exit_training import ExitTrainConfig, Progress, probe_data, train_exit_heads
from testbed.model.llama import ExitClassifiers
from testbed.runinfo import write_run_info

TRAIN_SETS = ("cnndm", "xsum", "scitldr")
CARD_FILE = "EXITS_CARD.md"


@dataclass(frozen=True)
class ExitRecipeConfig:
    train: ExitTrainConfig = ExitTrainConfig()
    eval_sets: tuple[str, ...] = ("cnndm", "xsum")
    num_eval_articles: int = 32  # per evaluation set
    eval_new_tokens: int = 64


def training_examples(data_dir, cfg: ExitTrainConfig) -> list[SummaryExample]:
    """An even, seeded draw from the training parts of the three sets."""
    rng = np.random.default_rng(cfg.seed)
    per_set = cfg.num_examples // len(TRAIN_SETS)
    out = []
    for name in TRAIN_SETS:
        pool = load_summaries(name, "train", data_dir)
        out += [pool[i] for i in rng.permutation(len(pool))[:per_set].tolist()]
    return out


def held_out_agreement(
    ckpt: Checkpoint, heads: ExitClassifiers, cfg: ExitRecipeConfig, data_dir
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per evaluation set, per-layer agreement with the final token on greedy summaries:
    through the logit lens, and through the adapters (one generation serves both)."""
    engine = LLMEngine(ckpt, EngineConfig(kv_cache_mb=1024))
    params = SamplingParams(max_tokens=cfg.eval_new_tokens)
    chars = cfg.train.max_article_chars
    lens, adapted = {}, {}
    for name in cfg.eval_sets:
        examples = load_summaries(name, "eval", data_dir)[: cfg.num_eval_articles]
        prompts = [ckpt.prompt.summary_request(ex.article[:chars], name) for ex in examples]
        outputs = engine.generate(prompts, params)
        states = []
        with torch.inference_mode():
            for o in outputs:
                ids = [*o.prompt_token_ids, *o.token_ids]
                hs = torch.stack(ckpt.model.dense_hidden_states(torch.tensor([ids])))  # [L,1,T,d]
                first = len(o.prompt_token_ids) - 1  # predicts the first generated token
                states.append(hs[:, 0, first : len(ids) - 1].transpose(0, 1))  # [t, L, d]
        states = torch.cat(states)
        lens[name] = probe_data(ckpt.model, None, states)[1].mean(dim=1).tolist()
        adapted[name] = probe_data(ckpt.model, heads, states)[1].mean(dim=1).tolist()
    return lens, adapted


def build_exit_heads(
    ckpt: Checkpoint, cfg: ExitRecipeConfig, data_dir, out_dir: Path, progress: Progress
) -> dict:
    t0 = time.perf_counter()
    torch.set_num_threads(torch.get_num_threads())  # explicit: thread count affects determinism
    examples = training_examples(data_dir, cfg.train)
    heads, facts = train_exit_heads(ckpt, examples, cfg.train, progress)
    facts["train_wall_s"] = round(time.perf_counter() - t0, 1)
    progress("evaluate", 0, 1, "held-out greedy summaries")
    before, after = held_out_agreement(ckpt, heads, cfg, data_dir)
    progress("evaluate", 1, 1, "")
    out_dir.mkdir(parents=True, exist_ok=True)
    base = checkpoint_hash(ckpt.path)
    # float16 on disk (loaded back in the model's dtype): the file the repository ships stays small
    save_exit_heads(out_dir / EXIT_HEADS_FILE, heads, base_hash=base, dtype=torch.float16)
    facts |= {
        "base_checkpoint_hash": base,
        "file_bytes": (out_dir / EXIT_HEADS_FILE).stat().st_size,
        "total_wall_s": round(time.perf_counter() - t0, 1),
        "agreement_logit_lens": before,
        "agreement_adapters": after,
    }
    write_run_info(out_dir, cfg, seed=cfg.train.seed, **facts)
    (out_dir / CARD_FILE).write_text(exits_card(ckpt, cfg, facts))
    return facts


def _agreement_table(facts: dict, num_layers: int) -> str:
    before, after = facts["agreement_logit_lens"], facts["agreement_adapters"]
    sets = list(before)
    head = "| exit layer | " + " | ".join(f"{s} lens | {s} adapters" for s in sets) + " |"
    rule = "|---" * (1 + 2 * len(sets)) + "|"
    rows = []
    for layer in range(1, num_layers + 1):
        if layer % 3 and layer != num_layers:
            continue
        cells = [f"{before[s][layer - 1]:.1%} | {after[s][layer - 1]:.1%}" for s in sets]
        rows.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows])


def exits_card(ckpt: Checkpoint, cfg: ExitRecipeConfig, facts: dict) -> str:
    t, L = cfg.train, ckpt.config.num_hidden_layers
    return f"""# Exit adapters for `{ckpt.path.name}`

`exit_heads.safetensors` ({facts["file_bytes"] / 1e6:.2f} MB) holds, for each of the {L - 1} exit
layers before the last, an exit adapter n_l(h) = RMSNorm(h + h·A_l·B_l)·g_l (rank {t.adapter_rank})
that replaces the shared final norm in front of the model's own LM head, and CALM's logistic probe
on n_l(h). The backbone (checkpoint hash `{facts["base_checkpoint_hash"]}`) is frozen; the file is
refused for any other backbone.

## Training (`eetb train-exits`, seed {t.seed})

Self-distillation against the final layer: {facts["num_examples"]} article/summary pairs drawn
evenly from the training parts of CNN/DM, XSum and SciTLDR, each in the model's chat prompt
("Summarize the following article in N sentences." + the article's first {t.max_article_chars}
characters) with the reference summary as the answer. Hidden states of every layer were cached once
at {facts["num_cached_positions"]:,} positions ({facts["num_answer_positions"]:,} answer positions
and {t.prompt_positions} random prompt positions per example). Loss: KL(final ‖ exit) over the
{facts["distillation_vocab"]:,} tokens the final layer ranks in its top 8 most often; {t.num_steps}
Adam steps (lr {t.lr:g}) of {t.batch_positions} positions × {t.layers_per_step} random exit layers.
Probes: {t.probe_steps} Adam steps on {t.probe_positions:,} positions, label "this exit's
full-vocabulary argmax equals the final layer's". Wall time {facts["total_wall_s"] / 60:.1f} min
on a 2-core CPU (training {facts["train_wall_s"] / 60:.1f} min, the rest evaluation).

## Agreement with the final token, held out

On the model's own greedy full-depth summaries ({cfg.eval_new_tokens} new tokens) of the first
{cfg.num_eval_articles} evaluation articles of each set (never trained on), teacher-forced: how
often each exit layer's token equals the last layer's, through the final norm alone (logit lens,
what a checkpoint without this file runs) and through the adapters.

{_agreement_table(facts, L)}
"""
