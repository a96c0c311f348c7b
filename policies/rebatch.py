"""Rebatch (DREX): park a small continuing group at an exit point and run its deep layers later,
together with other parked rows. Its own module because parking is the one batching concept
that spans steps: the scheduler's resume gate (core/resume_gate.py) asks `should_resume`, and a
resumed row's step starts at its parked layer (`step_exits_from`).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from policies.batching import BatchDecision, BatchingPolicy, _decision
from policies.errors import PolicyConfigError
from policies.fast_path import StepExits


@dataclass(frozen=True)
class RebatchBatching(BatchingPolicy):
    """DREX: park a small continuing group and run its deep layers later, with other parked rows.

    Splitting a row's step into a shallow pass (layers 1..ℓ now) and a deep pass (ℓ+1..L later)
    costs c = t_shallow + t_deep − t_full more than running it straight through. At decode batch
    sizes a layer's time is dominated by reading its weights once, nearly independent of the rows
    it serves, so running the deep layers for a handful of rows costs almost as much as for the
    whole batch. Parking those rows and later running one deep pass for >= min_deep_rows parked
    rows reads the deep weights once for all of them, which pays when the group is small compared
    with the batch. max_wait_steps bounds the latency a parked row can accumulate.
    """

    park_below_fraction: float = 0.5  # park when continuing rows / rows here is below this
    min_deep_rows: int = 4  # resume once this many rows are parked
    max_wait_steps: int = 8  # ... or once the oldest parked row has waited this many steps

    name: ClassVar[str] = "rebatch"

    def __post_init__(self) -> None:
        if not 0 <= self.park_below_fraction <= 1:
            raise PolicyConfigError(
                f"rebatch: park_below_fraction must be in [0, 1], got {self.park_below_fraction}"
            )
        if self.min_deep_rows < 1:
            raise PolicyConfigError(
                f"rebatch: min_deep_rows must be >= 1, got {self.min_deep_rows}"
            )
        if self.max_wait_steps < 0:
            raise PolicyConfigError(
                f"rebatch: max_wait_steps must be >= 0, got {self.max_wait_steps}"
            )

    def _decide(self, *, layer, num_layers, confident, has_token, positions) -> BatchDecision:
        is_continuing = ~has_token & ~confident
        num_continuing = np.count_nonzero(is_continuing)
        if num_continuing and num_continuing / is_continuing.size < self.park_below_fraction:
            return _decision(
                has_token, take=confident, keep=np.zeros_like(is_continuing), park=is_continuing
            )
        return _decision(has_token, take=confident, keep=is_continuing)

    def should_resume(self, *, num_parked: int, oldest_wait_steps: int) -> bool:
        # With nothing parked there is no deep pass to run, whatever the clock says.
        if num_parked <= 0:
            return False
        return num_parked >= self.min_deep_rows or oldest_wait_steps >= self.max_wait_steps

    def step_exits(self, confident, positions, exit_layers, num_layers: int) -> StepExits:
        # step_exits_from with every row from layer 0, by counts: the rows still going at an
        # exit point are all those confident above it, so none need listing until they park
        rows, ordered = len(confident), sorted(confident)
        running = rows
        num_points = num_evals = 0
        for layer in exit_layers:
            if not running:
                break
            num_points, num_evals = num_points + 1, num_evals + running
            going = rows - bisect_right(ordered, layer)
            if going and going / running < self.park_below_fraction:
                parked = [layer if c > layer else None for c in confident]
                executed = [layer if c > layer else c for c in confident]
                token_layer = [None if c > layer else c for c in confident]
                return StepExits(executed, token_layer, [False] * rows, num_points, num_evals,
                                 parked)  # fmt: skip
            running = going
        return StepExits(list(confident), list(confident), [False] * rows, num_points,
                         num_evals, [None] * rows)  # fmt: skip

    def step_exits_from(self, confident, positions, start_layers, exit_layers, num_layers: int
                        ) -> StepExits:  # fmt: skip
        # confident rows take their token and stop (as shrink) until the rows still going are
        # a small enough share of those at an exit point: then they all park there. A row
        # joins at the first exit point above its start layer, and its confident layer (an
        # exit point, or num_layers) is at or above each point it reaches: a row that does
        # not park stops there.
        rows = len(confident)
        executed, token_layer = list(confident), list(confident)  # parked rows: see below
        parked: list[int | None] = [None] * rows
        running = [r for r in range(rows) if not start_layers[r]]
        joining = [r for r in range(rows) if start_layers[r]]
        num_points = num_evals = 0
        for layer in exit_layers:
            if joining:
                running += [r for r in joining if start_layers[r] < layer]
                joining = [r for r in joining if start_layers[r] >= layer]
            if not running:
                if joining:
                    continue
                break
            num_points, num_evals = num_points + 1, num_evals + len(running)
            going = [r for r in running if confident[r] > layer]
            if going and len(going) / len(running) < self.park_below_fraction:
                for r in going:
                    executed[r], token_layer[r], parked[r] = layer, None, layer
                going = []
            running = going
        return StepExits(executed, token_layer, [False] * rows, num_points, num_evals, parked)
