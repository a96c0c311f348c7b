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


@dataclass(frozen=True)
class FillKind:
    """A KV-fill policy reduced to what it does with all of a row's skipped layers: the
    simulator's fast path (no masks per row)."""

    is_filled_now: bool  # every skipped layer computes its K/V before the step ends
    is_owed: bool  # every skipped layer is owed, resolved later as the policy's `resolve`


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
    # the fast path: what `decide` does with every skipped layer; None: the policy decides per
    # layer (tests/test_sim_fastpath.py checks each built-in against `decide`)
    fast_kind: ClassVar[FillKind | None] = None

    @property
    def fill_kind(self) -> FillKind | None:
        """`fast_kind` where it is this policy's own: None for a subclass that overrides
        `decide` or `_from_skipped` below the class that set it."""
        cls = type(self)
        owner = next(c for c in cls.__mro__ if "fast_kind" in c.__dict__)
        deciders = [next(c for c in cls.__mro__ if n in c.__dict__)
                    for n in ("decide", "_from_skipped")]  # fmt: skip
        return cls.fast_kind if all(issubclass(owner, d) for d in deciders) else None

    def decide(self, *, executed_layers: np.ndarray, num_layers: int) -> FillDecision:
        """executed_layers: int [rows], the number of layers each row computed this step."""
        skipped = skipped_layers(executed_layers, num_layers)
        return self._from_skipped(skipped)

    def _from_skipped(self, skipped: np.ndarray) -> FillDecision:
        # a policy that treats all its skipped layers alike is its FillKind; one that decides
        # per layer overrides this
        kind = self.fast_kind
        if kind is None:
            raise NotImplementedError(
                f"{type(self).__name__} sets no fast_kind: override _from_skipped"
            )
        none = np.zeros_like(skipped)
        return FillDecision(fill_now=skipped if kind.is_filled_now else none,
                            owe=skipped if kind.is_owed else none)  # fmt: skip


@dataclass(frozen=True)
class CopyFill(KvFillPolicy):
    """Feed the exit hidden state to every skipped layer, computing only its K/V (Miao; CALM)."""

    name: ClassVar[str] = "copy"
    fast_kind: ClassVar[FillKind | None] = FillKind(is_filled_now=True, is_owed=False)


@dataclass(frozen=True)
class LazyFill(KvFillPolicy):
    """FREE: keep the exit hidden state and push it through the deep layers on the next deep run."""

    name: ClassVar[str] = "lazy"
    fast_kind: ClassVar[FillKind | None] = FillKind(is_filled_now=False, is_owed=True)
    resolve: ClassVar[Resolve] = Resolve.DEEP


@dataclass(frozen=True)
class RecomputeFill(KvFillPolicy):
    """EE-LLM: recompute the missing positions from layer 0 at the next full-depth step."""

    name: ClassVar[str] = "recompute"
    fast_kind: ClassVar[FillKind | None] = FillKind(is_filled_now=False, is_owed=True)
    resolve: ClassVar[Resolve] = Resolve.FROM_LAYER0


@dataclass(frozen=True)
class SkipFill(KvFillPolicy):
    """Write nothing; deeper attention ignores the missing positions (quality baseline)."""

    name: ClassVar[str] = "skip"
    fast_kind: ClassVar[FillKind | None] = FillKind(is_filled_now=False, is_owed=False)


KV_FILL_POLICIES: tuple[type[KvFillPolicy], ...] = (CopyFill, LazyFill, RecomputeFill, SkipFill)
