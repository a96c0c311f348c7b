"""The built-in model's recipe: data → tokenizer → multi-exit training → probes → checkpoint →
evaluation → model card. ``eetb train`` calls :func:`build_builtin_model`."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from testbed.datasets import load_summaries
from testbed.model.checkpoint import save_checkpoint
from testbed.model.evaluate import EvalReport, evaluate, layer_table
from testbed.model.train import (
    BOS_ID,
    TrainConfig,
    encode_example,
    exit_loss_weights,
    fit_exit_classifiers,
    train_model,
    train_tokenizer,
)
from testbed.runinfo import to_jsonable, write_run_info

log = logging.getLogger(__name__)
TRAIN_SETS = ("cnndm", "xsum", "scitldr")
EVAL_SET = "cnndm"


@dataclass(frozen=True)
class RecipeConfig:
    train: TrainConfig = TrainConfig()
    num_eval_articles: int = 200
    max_article_tokens: int = 400  # evaluation prompts are cut as training articles were
    max_new_tokens: int = 64


Progress = Callable[[str, int, int, str], None]  # (phase, done, total, note)


def build_builtin_model(
    cfg: RecipeConfig, data_dir: str | Path | None, out_dir: Path, progress: Progress
) -> EvalReport:
    t0 = time.perf_counter()
    torch.set_num_threads(torch.get_num_threads())  # explicit: thread count affects determinism
    train_ex = [ex for name in TRAIN_SETS for ex in load_summaries(name, "train", data_dir)]
    eval_ex = load_summaries(EVAL_SET, "eval", data_dir)[: cfg.num_eval_articles]
    tok = train_tokenizer(
        [f"{ex.article}\n{ex.reference}" for ex in train_ex], cfg.train.vocab_size
    )
    seqs = [encode_example(tok, ex, cfg.train) for ex in train_ex]
    total = cfg.train.num_steps

    def on_step(step: int, loss: float) -> None:
        progress("train", step + 1, total, f"loss {loss:.3f}")

    model = train_model(cfg.train, seqs, tok.get_vocab_size(), on_step)
    t_train = time.perf_counter() - t0
    heads = fit_exit_classifiers(model, seqs, cfg.train)
    save_checkpoint(out_dir, model, tokenizer=tok, exit_heads=heads)
    report = evaluate(
        model,
        tok,
        eval_ex,
        max_article_tokens=cfg.max_article_tokens,
        max_new_tokens=cfg.max_new_tokens,
        progress=lambda i: progress("evaluate", i + 1, len(eval_ex), ""),
    )
    wall = time.perf_counter() - t0
    num_tokens = sum(map(len, seqs))
    facts = {
        "num_train_examples": len(seqs),
        "num_train_tokens": num_tokens,
        "train_wall_s": round(t_train, 1),
        "total_wall_s": round(wall, 1),
        "num_params": sum(p.numel() for p in model.parameters()),
        "bos_id": BOS_ID,
    }
    write_run_info(out_dir, cfg, seed=cfg.train.seed, **facts, report=_report_summary(report))
    (out_dir / "eval_summaries.json").write_text(json.dumps(list(report.summaries), indent=1))
    (out_dir / "MODEL_CARD.md").write_text(model_card(cfg, report, facts))
    return report


def _report_summary(report: EvalReport) -> dict:
    out = to_jsonable(report)
    out.pop("summaries")
    return out


def model_card(cfg: RecipeConfig, report: EvalReport, facts: dict) -> str:
    t = cfg.train
    weights = ", ".join(f"{w:.3f}" for w in exit_loss_weights(t.num_layers))
    return f"""# eetb built-in early-exit model

A {t.num_layers}-layer Llama-architecture decoder ({facts["num_params"]:,} parameters; hidden
{t.hidden_size}, {t.num_heads} query / {t.num_kv_heads} key-value heads, SwiGLU {t.intermediate_size},
RoPE θ={t.rope_theta:g}, tied embeddings, byte-level BPE of {t.vocab_size} tokens) trained from scratch
by `eetb train` with seed {t.seed}. Every layer can exit through the shared final norm and LM head;
`exit_heads.safetensors` holds one logistic probe per layer (CALM's classifier). The directory is an
HF-format checkpoint: `transformers.LlamaForCausalLM.from_pretrained` loads it as it is.

## Data and split

Article → summary pairs, formatted `<s>ARTICLE\\nSummary: SUMMARY</s>`, articles cut to fit
{t.max_seq_len} tokens: CNN/DailyMail and XSum (the HELM 1,000-item files, minus a fixed held-out
set of {200} items each chosen by a seeded permutation; see `testbed/datasets.py`) and the SciTLDR
train part; {facts["num_train_examples"]:,} examples, {facts["num_train_tokens"]:,} tokens. The
evaluation below uses the first {report.num_articles} held-out CNN/DM articles, which training never saw.

## Training

{t.num_steps} steps of AdamW (lr {t.lr:g}, cosine to 10%, {t.warmup_steps} warm-up steps, weight
decay {t.weight_decay}), batch {t.batch_size}, bf16 autocast={t.use_bf16}. Loss: Σ_l w_l·CE(exit_l), with
CALM's weights w_l = l / Σ l = [{weights}]; intermediate exits are scored on a random
{t.exit_sample_fraction:.0%} of positions per step. Exit probes: {t.classifier_steps} Adam steps on
hidden states of {t.classifier_batches} training batches, label "this layer's argmax equals the final
layer's". Wall time: {facts["train_wall_s"] / 60:.1f} min training, {facts["total_wall_s"] / 60:.1f} min
in all (tokenizer, training, probes, evaluation) on a 2-core CPU.

## Per exit layer, on the evaluation split

Over the {report.num_tokens:,} tokens of the model's own greedy summaries (teacher-forced), i.e.
what an oracle capture sees:

{layer_table(report)}

## Summaries

Greedy, full depth, at most {cfg.max_new_tokens} new tokens, articles cut to {cfg.max_article_tokens}
tokens: ROUGE-L F1 **{report.rouge_l:.4f}** against the references; the lead-3 baseline on the same
articles scores {report.lead3_rouge_l:.4f}. The model is tiny and trained for minutes: it is here to
give early exit something real to find, not to summarise well.
"""
