"""The three confidence signals of DESIGN §4 at one exit point, for a set of rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from policies.exit_rules import ExitSignals
from testbed.model.llama import ExitClassifiers, LlamaModel, exit_logits, exit_norm

SIGNAL_NAMES = ("softmax_margin", "hidden_cosine", "classifier_prob")


@dataclass(frozen=True)
class ExitPointSignals:
    signals: ExitSignals  # numpy arrays [rows], only the requested ones set
    logits: torch.Tensor | None  # [rows, vocab] when the softmax signal needed them


def softmax_margin(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 probability of each row's distribution: [rows, vocab] -> [rows]."""
    top2 = logits.float().softmax(-1).topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


def hidden_cosine(h: torch.Tensor, h_prev: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each row's hidden state at l and at l-1: [rows, hidden] -> [rows]."""
    return F.cosine_similarity(h.float(), h_prev.float(), dim=-1)


def classifier_prob(
    model: LlamaModel, heads: ExitClassifiers, layer: int, h: torch.Tensor
) -> torch.Tensor:
    """CALM's probe on the exit-normed hidden state: [rows, hidden] -> [rows]."""
    return heads.prob(layer, exit_norm(model, heads, layer, h).to(heads.weight.dtype)).float()


@torch.inference_mode()
def compute_signals(
    model: LlamaModel,
    heads: ExitClassifiers | None,
    layer: int,
    h: torch.Tensor,
    h_prev: torch.Tensor,
    *,
    needed: frozenset[str],
) -> ExitPointSignals:
    """Signals named in ``needed`` (a subset of SIGNAL_NAMES) for rows h [rows, hidden]."""
    unknown = needed - set(SIGNAL_NAMES)
    if unknown:
        raise ValueError(f"unknown signal(s) {sorted(unknown)} (known: {', '.join(SIGNAL_NAMES)})")
    logits = margin = cosine = prob = None
    if "softmax_margin" in needed:
        logits = exit_logits(model, heads, layer, h)
        margin = softmax_margin(logits).cpu().numpy()
    if "hidden_cosine" in needed:
        cosine = hidden_cosine(h, h_prev).cpu().numpy()
    if "classifier_prob" in needed:
        if heads is None:
            raise ValueError("the classifier signal needs exit_heads.safetensors in the checkpoint")
        prob = classifier_prob(model, heads, layer, h).cpu().numpy()
    return ExitPointSignals(ExitSignals(margin, cosine, prob), logits)
