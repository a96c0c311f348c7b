"""Evaluation of an early-exit checkpoint: per-exit agreement and margin, ROUGE, a model card."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from testbed.datasets import SummaryExample
from testbed.model.llama import LlamaModel
from testbed.model.reference import greedy_generate
from testbed.quality import lead_n, rouge


@dataclass(frozen=True)
class LayerStats:
    layer: int  # exit point: number of layers run
    agreement: float  # fraction of tokens whose argmax at this layer equals the final token
    mean_margin: float  # mean top-1 minus top-2 softmax probability of the exit head


@dataclass(frozen=True)
class EvalReport:
    num_articles: int
    num_tokens: int  # generated tokens the layer statistics are over
    layers: tuple[LayerStats, ...]
    rouge_l: float  # full-depth greedy summaries, mean F1
    lead3_rouge_l: float  # lead-3 baseline on the same articles
    summaries: tuple[str, ...]


def prompt_ids(tok: Tokenizer, article: str, max_article_tokens: int, bos_id: int) -> list[int]:
    return [bos_id, *tok.encode(article).ids[:max_article_tokens], *tok.encode("\nSummary:").ids]


@torch.inference_mode()
def layer_stats(model: LlamaModel, sequences: Sequence[tuple[list[int], int]]) -> list[LayerStats]:
    """sequences: (token ids, index of the first generated token). Teacher-forced on the model's
    own greedy output, so the statistics are those an oracle capture of the same run would see."""
    L = model.num_layers
    agree, margin, count = torch.zeros(L), torch.zeros(L), 0
    for ids, first in sequences:
        states = model.dense_hidden_states(torch.tensor([ids]))
        span = slice(first - 1, len(ids) - 1)  # positions whose next token was generated
        final = model.exit_logits(states[-1][0, span]).argmax(-1)
        for i, h in enumerate(states):
            probs = model.exit_logits(h[0, span]).softmax(-1)
            top2 = probs.topk(2, dim=-1).values
            agree[i] += (probs.argmax(-1) == final).sum()
            margin[i] += (top2[:, 0] - top2[:, 1]).sum()
        count += len(final)
    return [LayerStats(i + 1, float(agree[i] / count), float(margin[i] / count)) for i in range(L)]


def evaluate(
    model: LlamaModel,
    tok: Tokenizer,
    examples: Sequence[SummaryExample],
    *,
    max_article_tokens: int,
    max_new_tokens: int,
    progress: Callable[[int], None] | None = None,
) -> EvalReport:
    bos, eos = model.config.bos_token_id, model.config.eos_token_id
    seqs, summaries = [], []
    for i, ex in enumerate(examples):
        prompt = prompt_ids(tok, ex.article, max_article_tokens, bos)
        out, _ = greedy_generate(model, prompt, max_new_tokens, eos_token_id=eos)
        seqs.append((prompt + out, len(prompt)))
        summaries.append(tok.decode([t for t in out if t != eos]).strip())
        if progress is not None:
            progress(i)
    refs = [ex.reference for ex in examples]
    return EvalReport(
        num_articles=len(examples),
        num_tokens=sum(len(s) - f for s, f in seqs),
        layers=tuple(layer_stats(model, seqs)),
        rouge_l=rouge(summaries, refs).rougeL,
        lead3_rouge_l=rouge([lead_n(ex.article, 3) for ex in examples], refs).rougeL,
        summaries=tuple(summaries),
    )


def layer_table(report: EvalReport) -> str:
    lines = ["| exit layer | agreement with final token | mean softmax margin |", "|---|---|---|"]
    for s in report.layers:
        lines.append(f"| {s.layer} | {s.agreement:.1%} | {s.mean_margin:.3f} |")
    return "\n".join(lines)
