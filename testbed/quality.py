"""Output quality: ROUGE against references and agreement between two generations."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from rouge_score_rs import rouge_scorer

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class RougeScores:
    rouge1: float  # mean F1 in [0, 1]
    rouge2: float
    rougeL: float  # noqa: N815 (the metric's conventional name)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> RougeScores:
    """Mean ROUGE-1/2/L F1 over pairs, with stemming as in the CNN/DM literature."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)
        for key in totals:
            totals[key] += scores[key].fmeasure
    n = len(predictions)
    return RougeScores(totals["rouge1"] / n, totals["rouge2"] / n, totals["rougeL"] / n)


def lead_n(article: str, num_sentences: int = 3) -> str:
    """The lead-N baseline: the article's first N sentences."""
    return " ".join(_SENTENCE_END.split(article.strip())[:num_sentences])


def token_agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """Fraction of positions of the longer output where both emitted the same token."""
    longest = max(len(a), len(b))
    if longest == 0:
        return 1.0
    return sum(x == y for x, y in zip(a, b, strict=False)) / longest


def prefix_agreement(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix: where an early-exit stream first diverges from full depth."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
