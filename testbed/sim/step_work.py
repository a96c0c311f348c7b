"""The replay runner's answer for one step: the engine's StepResult plus the per-layer counts a
cost model prices (see cost_base.StepFeatures)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from testbed.core.step import StepResult
from testbed.sim.cost_base import StepFeatures


@dataclass(frozen=True)
class StepWork:
    """What a replayed step did, per layer of the trace's model."""

    result: StepResult
    layer_tokens: tuple[int, ...]  # tokens that ran each layer fully
    layer_context_tokens: tuple[int, ...]  # sum of the context lengths those tokens attend
    layer_kv_only_tokens: tuple[int, ...]  # tokens that only computed K/V there (copy fill)
    executed: tuple[int, ...]  # per plan row: layers computed for its newest position


class SteadyWork(NamedTuple):
    """A steady decode step (Scheduler.steady_step), replayed without a plan: per row, in the
    stretch's row order (steady_step's), its exit layer (its token is the replay's: SteadyStretch.tokens);
    and the step's features for the cost model. A NamedTuple: the simulator builds one per
    step of most of its steps."""

    exit_layers: list[int | None]  # None: the row parked (rebatch)
    is_forced: list[bool]
    features: StepFeatures
    parked_layers: list[int | None] | None = None  # where rows parked; None: none did
