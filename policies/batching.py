"""Batching policies: at an exit point, which decode rows fix their token, run on, or park.

`decide` sees only the rows still running at an exit point, as parallel 1-D arrays, and returns a
BatchDecision. The native engine, the simulator and the vLLM backend call the same objects, so
their step plans cannot drift apart (DESIGN.md §2). The final layer is not an exit point: there the
engine takes the remaining tokens itself, so `decide` is only called for 1 <= layer < num_layers.

BatchDecision invariants (checked at the end of every `decide`):
  * take_token only for rows without a token; is_forced is a subset of take_token;
  * park is disjoint from keep_running, take_token and rows that already have a token;
  * every row that leaves this exit point without a token (not in keep_running) is in
    take_token or park, so no row is ever dropped;
  * stop is True exactly when no row keeps running.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any, ClassVar

import numpy as np

from policies.errors import PolicyConfigError
from policies.fast_path import StepExits


@dataclass(frozen=True)
class BatchDecision:
    """What happens to each row at one exit point; every mask is bool [rows]."""

    take_token: np.ndarray  # row fixes its token now, from this exit point's head
    is_forced: np.ndarray  # subset of take_token that was not confident: involuntary exits
    keep_running: np.ndarray  # row computes the next layer (consensus: may already hold a token)
    park: np.ndarray  # row leaves without a token; its deep layers run in a later step (rebatch)
    stop: bool  # no row runs the next layer

    def check(self, has_token: np.ndarray) -> None:
        """Raise AssertionError naming the first broken invariant and its rows."""
        no_token_left = ~has_token & ~self.take_token & ~self.keep_running
        broken = {
            "take_token for a row that already has a token": self.take_token & has_token,
            "is_forced outside take_token": self.is_forced & ~self.take_token,
            "park overlaps keep_running": self.park & self.keep_running,
            "park overlaps take_token": self.park & self.take_token,
            "park for a row that already has a token": self.park & has_token,
            "row leaves without a token and is not parked": no_token_left & ~self.park,
        }
        for what, rows in broken.items():
            if rows.any():
                raise AssertionError(f"{what}: rows {np.flatnonzero(rows).tolist()}")
        if self.stop == bool(self.keep_running.any()):
            raise AssertionError(f"stop={self.stop} but keep_running={self.keep_running}")


def _decision(
    has_token: np.ndarray,
    *,
    take: np.ndarray,
    keep: np.ndarray,
    forced: np.ndarray | None = None,
    park: np.ndarray | None = None,
) -> BatchDecision:
    none = np.zeros_like(has_token)
    return BatchDecision(
        take_token=take,
        is_forced=none if forced is None else forced,
        keep_running=keep,
        park=none if park is None else park,
        stop=not keep.any(),
    )


def _definer(cls: type, name: str) -> type:
    return next(c for c in cls.__mro__ if name in c.__dict__)


@dataclass(frozen=True)
class BatchingPolicy:
    """Base: validates inputs, masks `confident` to rows without a token, checks the result."""

    name: ClassVar[str]  # registry, config and CLI key
    kind: ClassVar[str] = "batching"
    is_early_exit: ClassVar[bool] = True  # False: engines may skip exit heads entirely
    needs_signals: ClassVar[bool] = True  # False: engines may skip computing exit signals

    def decide(
        self,
        *,
        layer: int,
        num_layers: int,
        confident: np.ndarray,
        has_token: np.ndarray,
        positions: np.ndarray,
    ) -> BatchDecision:
        """Decide at exit point `layer` for the rows still running; arrays are [rows]."""
        if not 1 <= layer < num_layers:
            raise ValueError(f"decide() needs 1 <= layer < num_layers, got {layer}/{num_layers}")
        has_token = np.asarray(has_token, dtype=bool)
        # `confident` means nothing for rows that fixed their token at an earlier exit point.
        newly_confident = np.asarray(confident, dtype=bool) & ~has_token
        positions = np.asarray(positions, dtype=np.int64)
        if (
            not has_token.ndim == 1
            or not has_token.shape == newly_confident.shape == positions.shape
        ):
            raise ValueError(
                "confident, has_token and positions must be 1-D arrays of equal length"
            )
        decision = self._decide(
            layer=layer,
            num_layers=num_layers,
            confident=newly_confident,
            has_token=has_token,
            positions=positions,
        )
        decision.check(has_token)
        return decision

    def _decide(self, **inputs: Any) -> BatchDecision:
        """The policy's own rule, given decide()'s keywords with the inputs checked and
        ``confident`` masked to the rows without a token."""
        raise NotImplementedError

    def should_resume(self, *, num_parked: int, oldest_wait_steps: int) -> bool:
        """Whether parked rows should run their deep layers now; only rebatch ever parks."""
        return True

    def step_exits(
        self, confident: Sequence[int], positions: Sequence[int], exit_layers: Sequence[int],
        num_layers: int,
    ) -> StepExits | None:  # fmt: skip
        """The fast path: one step's outcome for decode rows that all start at layer 0, in plain
        Python (far faster than numpy on the 1-30 rows of a typical step). confident: per row,
        the first exit layer where the rule is confident (num_layers: never); positions: per
        row, the output index of its token; exit_layers: ascending, all below num_layers. It
        must equal asking `decide` at every exit point (tests/test_sim_fastpath.py). None: no
        fast path; the caller runs the general one."""
        return None

    def step_exits_from(
        self, confident: Sequence[int], positions: Sequence[int], start_layers: Sequence[int],
        exit_layers: Sequence[int], num_layers: int,
    ) -> StepExits | None:  # fmt: skip
        """`step_exits` for rows that start at ``start_layers`` (rebatch's resume rows start
        at their parked layer; a row joins the exit points above its start, and its first
        confident layer lies above it). None: no fast path. Only a policy that parks needs it."""
        return None

    @property
    def has_step_exits(self) -> bool:
        """Whether `step_exits` is this policy's own: a subclass that overrides `decide` or
        `_decide` below the class that wrote `step_exits` gets the general path."""
        cls = type(self)
        fast = _definer(cls, "step_exits")
        return fast is not BatchingPolicy and all(
            issubclass(fast, _definer(cls, name)) for name in ("decide", "_decide")
        )


@dataclass(frozen=True)
class FullBatching(BatchingPolicy):
    """No early exit: every row runs every layer (the baseline)."""

    name: ClassVar[str] = "full"
    is_early_exit: ClassVar[bool] = False
    needs_signals: ClassVar[bool] = False

    def _decide(self, *, layer, num_layers, confident, has_token, positions) -> BatchDecision:
        return _decision(has_token, take=np.zeros_like(has_token), keep=np.ones_like(has_token))

    def step_exits(self, confident, positions, exit_layers, num_layers: int) -> StepExits:
        rows = len(confident)
        return StepExits([num_layers] * rows, [num_layers] * rows, [False] * rows, 0, 0)


@dataclass(frozen=True)
class ConsensusBatching(BatchingPolicy):
    """Run until every row is confident; exited rows keep computing, which fills their KV.

    Miao et al. 2024 (arXiv 2407.20272): a row keeps the token of the layer where it first became
    confident, but keeps running so that deeper layers still get its K/V.
    """

    name: ClassVar[str] = "consensus"

    def _decide(self, *, layer, num_layers, confident, has_token, positions) -> BatchDecision:
        is_done = has_token | confident
        return _decision(has_token, take=confident, keep=np.full_like(is_done, not is_done.all()))

    def step_exits(self, confident, positions, exit_layers, num_layers: int) -> StepExits:
        # the batch runs until its last row is confident; each row keeps its first confident token
        stop = max(confident)
        num_evals = sum(map(bisect_right, repeat(exit_layers), confident))
        return StepExits([stop] * len(confident), list(confident), [False] * len(confident),
                         bisect_right(exit_layers, stop), num_evals)  # fmt: skip


@dataclass(frozen=True)
class QuorumBatching(BatchingPolicy):
    """Consensus that stops once `fraction` of the rows hold a token, forcing out the rest.

    DREX's "grouped exit". fraction=1 is exactly consensus.
    """

    fraction: float  # in (0, 1]: share of rows with a token that ends the step

    name: ClassVar[str] = "quorum"

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise PolicyConfigError(f"quorum: fraction must be in (0, 1], got {self.fraction}")

    def _decide(self, *, layer, num_layers, confident, has_token, positions) -> BatchDecision:
        is_done = has_token | confident
        # A ratio, not count >= fraction * rows: 0.3 * 10 is 3.0000000000000004 in floating point.
        if is_done.size and np.count_nonzero(is_done) / is_done.size >= self.fraction:
            forced = ~is_done
            return _decision(
                has_token, take=confident | forced, keep=np.zeros_like(is_done), forced=forced
            )
        return _decision(has_token, take=confident, keep=np.ones_like(is_done))

    def step_exits(self, confident, positions, exit_layers, num_layers: int) -> StepExits:
        # the batch runs together to `stop`; rows not yet confident there are forced out
        stop = self._stop(confident, exit_layers, num_layers)
        num_evals = sum([bisect_right(exit_layers, min(c, stop)) for c in confident])
        return StepExits([stop] * len(confident), [min(c, stop) for c in confident],
                         [c > stop for c in confident], bisect_right(exit_layers, stop),
                         num_evals)  # fmt: skip

    def _stop(self, confident: Sequence[int], exit_layers: Sequence[int], num_layers: int) -> int:
        """The first exit layer where the share of rows holding a token reaches `fraction`."""
        ordered = sorted(confident)
        for layer in exit_layers:
            num_done = bisect_right(ordered, layer)
            if num_done / len(ordered) >= self.fraction:  # the ratio, exactly as in _decide
                return layer
        return num_layers


@dataclass(frozen=True)
class ShrinkBatching(BatchingPolicy):
    """Per-sequence exit: confident rows take their token and leave; the batch shrinks."""

    name: ClassVar[str] = "shrink"

    def _decide(self, *, layer, num_layers, confident, has_token, positions) -> BatchDecision:
        return _decision(has_token, take=confident, keep=~has_token & ~confident)

    def step_exits(self, confident, positions, exit_layers, num_layers: int) -> StepExits:
        # every row leaves at its own first confident exit point
        num_evals = sum(map(bisect_right, repeat(exit_layers), confident))
        return StepExits(list(confident), list(confident), [False] * len(confident),
                         bisect_right(exit_layers, max(confident)), num_evals)  # fmt: skip


@dataclass(frozen=True)
class SkipDecodeBatching(BatchingPolicy):
    """SkipDecode (2023): the whole batch exits at one layer per step, never rising with position.

    target(t) = max(min_layer, L − floor((L − min_layer) · t / N)). Later tokens attend to KV that
    earlier (deeper) tokens already filled, which is why the schedule must not rise. The batch
    uses the target of its earliest position, the deepest, so no row exits above its own schedule.
    """

    max_tokens: int  # N: output length over which the exit layer falls to min_layer
    min_layer: int  # shallowest exit layer of the schedule

    name: ClassVar[str] = "skipdecode"
    needs_signals: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise PolicyConfigError(f"skipdecode: max_tokens must be >= 1, got {self.max_tokens}")
        if self.min_layer < 1:
            raise PolicyConfigError(f"skipdecode: min_layer must be >= 1, got {self.min_layer}")

    def target_layers(self, positions: np.ndarray, num_layers: int) -> np.ndarray:
        """int [rows]: each row's own scheduled exit layer, in min_layer..num_layers."""
        positions = np.asarray(positions, dtype=np.int64)
        span = max(num_layers - self.min_layer, 0)
        # Integer floor division keeps the schedule exact (no float rounding at t = N).
        scheduled = num_layers - (span * positions) // self.max_tokens
        return np.minimum(np.maximum(scheduled, self.min_layer), num_layers)

    def target_layer(self, positions: np.ndarray, num_layers: int) -> int:
        """The batch's exit layer: the deepest row target; num_layers for an empty batch."""
        targets = self.target_layers(positions, num_layers)
        return int(targets.max()) if targets.size else num_layers

    def _decide(self, *, layer, num_layers, confident, has_token, positions) -> BatchDecision:
        if layer >= self.target_layer(positions, num_layers):
            # Scheduled exits, not forced ones: the schedule, not low confidence, ends the step.
            return _decision(has_token, take=~has_token, keep=np.zeros_like(has_token))
        return _decision(has_token, take=np.zeros_like(has_token), keep=np.ones_like(has_token))

    def step_exits(self, confident, positions, exit_layers, num_layers: int) -> StepExits:
        # the schedule, not confidence, ends the step: no rule evaluations, no forced exits
        rows = len(confident)
        target = self.target_layer(np.asarray(positions, dtype=np.int64), num_layers)
        stop = next((e for e in exit_layers if e >= target), num_layers)
        return StepExits([stop] * rows, [stop] * rows, [False] * rows,
                         bisect_right(exit_layers, stop), 0)  # fmt: skip
