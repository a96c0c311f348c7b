"""KV-fill policies: what happens to the K/V a row owes to the layers it did not compute.

A row that exits after `executed` layers has K/V in layers 0..executed-1 (0-based) for this
position; deeper layers have none, yet later tokens that run deep will attend to this position.
The policy only marks the missing cells; the engine (or the simulator's cost model) does the work.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

import numpy as np


class Resolve(enum.Enum):
    """How a policy's owed K/V is filled later."""

    NEVER = "never"  # nothing is owed, or what is owed stays missing
    DEEP = "deep"  # the kept exit hidden state runs the deep layers at the row's next deep run
    FROM_LAYER0 = "from_layer0"  # the owed positions are recomputed from layer 0


@dataclass(frozen=True)
class FillDecision:
    """Per row and 0-based layer index; both masks are bool [rows, num_layers] and disjoint."""

    fill_now: np.ndarray  # write this layer's K/V before the step ends, from the exit hidden state
    owe: np.ndarray  # K/V still missing after the step; resolved later as the policy's `resolve`


def skipped_layers(executed_layers: np.ndarray, num_layers: int) -> np.ndarray:
    """bool [rows, num_layers]: True at the 0-based layers a row did not compute this step."""
    executed = np.asarray(executed_layers, dtype=np.int64)
    if executed.ndim != 1:
        raise ValueError(f"executed_layers must be 1-D [rows], got shape {executed.shape}")
    if np.any((executed < 0) | (executed > num_layers)):
        raise ValueError(f"executed_layers must lie in 0..{num_layers}, got {executed.tolist()}")
    return np.arange(num_layers)[None, :] >= executed[:, None]  # [rows, num_layers]


@dataclass(frozen=True)
class KvFillPolicy:
    """Base: turns the skipped-layer mask into a FillDecision."""

    name: ClassVar[str]  # registry, config and CLI key
    kind: ClassVar[str] = "kv_fill"
    resolve: ClassVar[Resolve] = Resolve.NEVER  # how owed K/V is filled later

    def decide(self, *, executed_layers: np.ndarray, num_layers: int) -> FillDecision:
        """executed_layers: int [rows], the number of layers each row computed this step."""
        skipped = skipped_layers(executed_layers, num_layers)
        return self._from_skipped(skipped)

    def _from_skipped(self, skipped: np.ndarray) -> FillDecision:
        raise NotImplementedError


@dataclass(frozen=True)
class CopyFill(KvFillPolicy):
    """Feed the exit hidden state to every skipped layer, computing only its K/V (Miao; CALM)."""

    name: ClassVar[str] = "copy"

    def _from_skipped(self, skipped: np.ndarray) -> FillDecision:
        return FillDecision(fill_now=skipped, owe=np.zeros_like(skipped))


@dataclass(frozen=True)
class LazyFill(KvFillPolicy):
    """FREE: keep the exit hidden state and push it through the deep layers on the next deep run."""

    name: ClassVar[str] = "lazy"
    resolve: ClassVar[Resolve] = Resolve.DEEP

    def _from_skipped(self, skipped: np.ndarray) -> FillDecision:
        return FillDecision(fill_now=np.zeros_like(skipped), owe=skipped)


@dataclass(frozen=True)
class RecomputeFill(KvFillPolicy):
    """EE-LLM: recompute the missing positions from layer 0 at the next full-depth step."""

    name: ClassVar[str] = "recompute"
    resolve: ClassVar[Resolve] = Resolve.FROM_LAYER0

    def _from_skipped(self, skipped: np.ndarray) -> FillDecision:
        return FillDecision(fill_now=np.zeros_like(skipped), owe=skipped)


@dataclass(frozen=True)
class SkipFill(KvFillPolicy):
    """Write nothing; deeper attention ignores the missing positions (quality baseline)."""

    name: ClassVar[str] = "skip"

    def _from_skipped(self, skipped: np.ndarray) -> FillDecision:
        return FillDecision(fill_now=np.zeros_like(skipped), owe=np.zeros_like(skipped))


KV_FILL_POLICIES: tuple[type[KvFillPolicy], ...] = (CopyFill, LazyFill, RecomputeFill, SkipFill)
