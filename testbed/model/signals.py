"""The three confidence signals of DESIGN §4 at one exit point, for a set of rows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from policies.exit_rules import ExitSignals
from testbed.model.llama import (
    ExitClassifiers,
    LlamaModel,
    exit_logits,
    exit_norm,
    stacked_exit_norms,
)

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


@dataclass(frozen=True)
class OracleRows:
    """An oracle step's record for each sampled row: every signal and the exit head's argmax at
    the recorded layers, as lists over layers 1..L with None at the layers not recorded."""

    signals: list[dict[str, list[float | None]]]  # per row: signal name -> [L]
    argmax: list[list[int | None]]  # per row: [L]


@torch.inference_mode()
def oracle_signals(
    states: torch.Tensor,
    layers: tuple[int, ...],
    *,
    final_norm: Callable[[torch.Tensor], torch.Tensor],
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    heads: ExitClassifiers | None,
    eps: float,
    final_logits: torch.Tensor | None = None,
) -> OracleRows:
    """The oracle's record from states [L + 1, rows, hidden] (index 0: the layer-1 input).

    Only ``layers`` (1-based, ascending) pay for the LM head, which on a large vocabulary costs
    several decoder layers each: an oracle of a few candidate exit points is what makes a
    capture cheap. ``final_norm`` and ``logits_of`` ([N, hidden] -> [N, vocab]) are the
    engine's own final norm and LM head; ``final_logits`` [rows, vocab], when given, are the
    last layer's, which the engine's sampler already computed (the last of ``layers`` must
    then be the model's last layer)."""
    num_layers, num_rows = states.shape[0] - 1, states.shape[1]
    index = torch.tensor(layers, device=states.device)
    deep, shallow = states[index], states[index - 1]  # [K, rows, hidden]
    normed = stacked_exit_norms(final_norm, heads, eps, deep, layers)
    if final_logits is None:
        logits = logits_of(normed.flatten(0, 1))  # [K * rows, vocab], one batched head call
    else:
        if layers[-1] != num_layers:
            raise ValueError(f"final_logits given but the oracle's layers {layers} stop short")
        logits = torch.cat([logits_of(normed[:-1].flatten(0, 1)), final_logits.to(normed.dtype)])
    per_layer = {
        "softmax_margin": softmax_margin(logits).view(len(layers), num_rows),
        "hidden_cosine": hidden_cosine(deep, shallow),
    }
    if heads is not None:
        w, b = heads.weight[index - 1], heads.bias[index - 1]
        prob = torch.sigmoid(torch.einsum("krh,kh->kr", normed.to(w.dtype), w) + b[:, None])
        per_layer["classifier_prob"] = prob.float()  # numpy has no bfloat16
    argmax = logits.argmax(-1).view(len(layers), num_rows).T.cpu().tolist()  # [rows][K]
    values = {name: v.T.cpu().tolist() for name, v in per_layer.items()}  # name -> [rows][K]
    slot: list[int | None] = [None] * num_layers
    for k, layer in enumerate(layers):
        slot[layer - 1] = k

    def spread(row: list) -> list:
        return [None if k is None else row[k] for k in slot]

    return OracleRows(
        signals=[{name: spread(v[r]) for name, v in values.items()} for r in range(num_rows)],
        argmax=[spread(argmax[r]) for r in range(num_rows)],
    )
