"""What every cost model shares: the step record it prices, its protocol and error, and the
relative-depth mapping that lets a trace of one model drive a cost model of another depth.

Kept apart from ``cost_model.py`` so that the models (``roofline.py``, ``profile_cost.py``) and
the factory that builds them (``cost_model.py``) import in one direction only.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import numpy as np

from testbed.cost_spec import CostModelError  # noqa: F401  (the models' error, re-exported)


class StepFeatures(NamedTuple):
    """What one simulated engine step did; built by the replay runner. A NamedTuple rather than
    a frozen dataclass: the simulator builds one per step, and a NamedTuple builds 2.6x faster."""

    num_rows: int  # sequences in the step; each sampled row needs one final LM head
    num_prefill_tokens: int  # prompt (or recompute) tokens fed; they run every layer
    num_decode_rows: int  # rows feeding one generated token (resume rows included)
    num_context_tokens: int  # sum over rows of the context length its last token attends to
    num_row_layers_executed: int  # (token, layer) pairs that ran a full layer
    num_kv_only_row_layers: int  # (token, layer) pairs that only computed K/V (copy fill)
    num_rule_evals: int  # exit-rule evaluations
    rule: str  # exit rule name of the run ("softmax", "hidden", "classifier") or "none"
    layer_tokens: tuple[int, ...]  # per layer of the trace's model: tokens that ran it fully
    layer_context_tokens: tuple[int, ...]  # per layer: sum of context lengths those tokens attend
    layer_kv_only_tokens: tuple[int, ...]  # per layer: tokens that only computed K/V there
    num_layers_run: int = 0  # layers at least one token ran fully
    num_exit_points: int = 0  # exit points where the policy decided: one batched call each
    num_attention_pairs: int = 0  # Σ layers, Σ tokens run there fully: position + 1 (causal)
    num_sampling_layers: int = 0  # distinct layers tokens were taken at: one sampling call each


class CostModel(Protocol):
    name: str

    def step_time_s(self, f: StepFeatures) -> float: ...


def _boundary_mass(counts: np.ndarray, num_target: int) -> np.ndarray:
    """Integral of the source counts (a step function of relative depth) from 0 up to each
    target layer boundary j/num_target, j = 0..num_target, in units of 1/(L_src·L_tgt) depth.

    Integer arithmetic, so totals survive exactly: source layer i spans [i·L_tgt, (i+1)·L_tgt)
    and target boundary j sits at j·L_src in those units. ``counts`` is [..., L_src].
    """
    num_source = counts.shape[-1]
    zero = np.zeros((*counts.shape[:-1], 1), dtype=counts.dtype)
    cumulative = np.concatenate([zero, np.cumsum(counts, axis=-1)], axis=-1)  # [..., L_src + 1]
    padded = np.concatenate([counts, zero], axis=-1)  # index L_src only at the end, rem == 0
    q, rem = np.divmod(np.arange(num_target + 1, dtype=np.int64) * num_source, num_target)
    return cumulative[..., q] * num_target + padded[..., q] * rem  # [..., L_tgt + 1]


def _check_depths(num_source: int, num_target: int) -> None:
    if num_target < 1:
        raise CostModelError(f"cannot map {num_source} trace layers onto {num_target} layers")
    if num_source < 1:
        raise CostModelError("cannot map a trace with no layers onto a model")


def spread_layers(counts: np.ndarray, num_target: int) -> np.ndarray:
    """Per-layer counts [..., L_src] → float [..., L_tgt] by relative depth (see map_layers),
    without rounding: what the cost models charge."""
    counts = np.asarray(counts)
    _check_depths(counts.shape[-1], num_target)
    if counts.shape[-1] == num_target:
        return counts.astype(np.float64)
    return np.diff(_boundary_mass(counts, num_target), axis=-1) / counts.shape[-1]


def map_layers(layer_counts: tuple[int, ...], target_num_layers: int) -> tuple[int, ...]:
    """Map per-layer counts of a trace with L_src layers onto a model with L_tgt layers.

    Source layer i covers relative depth [i/L_src, (i+1)/L_src); each target layer takes the
    source counts over its own depth interval, scaled so that a count present in every source
    layer stays the same in every target layer (8→32 repeats each layer 4 times, 32→8 averages
    groups of 4). The total of token-layers becomes round(total·L_tgt/L_src); the fractional
    parts go to the largest remainders, ties to the shallower layer.
    """
    counts = np.asarray(layer_counts, dtype=np.int64)
    if counts.ndim != 1:
        raise CostModelError(f"layer counts must be one number per layer, got shape {counts.shape}")
    _check_depths(len(counts), target_num_layers)
    if (counts < 0).any():
        raise CostModelError(f"layer counts must be non-negative, got {tuple(layer_counts)}")
    if len(counts) == target_num_layers:
        return tuple(int(x) for x in counts)
    num_source = len(counts)
    numerators = np.diff(_boundary_mass(counts, target_num_layers))  # exact value · L_src
    whole, remainder = np.divmod(numerators, num_source)
    total = (int(numerators.sum()) + num_source // 2) // num_source  # round half up
    missing = total - int(whole.sum())  # ≤ number of non-zero remainders
    order = np.argsort(-remainder, kind="stable")
    whole[order[:missing]] += 1
    return tuple(int(x) for x in whole)
