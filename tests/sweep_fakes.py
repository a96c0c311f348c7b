"""Stand-ins for ``simulate`` in the sweep tests. Top-level functions in an importable module, so
process-pool and Dask workers can unpickle them by name (the repository root must be on their path).

The fake is deterministic: an early-exit policy with threshold λ runs (2 - λ) times as fast as the
`full` baseline and agrees with full depth on a fraction λ of its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from testbed.sim.errors import SimulationError
from testbed.sim.metrics import Metrics, RequestRecord, StepRecord, compute_metrics
from testbed.workload.transforms import ClipReport

NUM_TOKENS = 20
BASE_DURATION_S = 10.0


@dataclass(frozen=True)
class FakeResult:
    config: object
    metrics: Metrics
    clip: ClipReport = ClipReport(1, 0, 0, 0)


def fake_metrics(cfg) -> Metrics:
    is_full = cfg.policy.batching == "full"
    threshold = 1.0 if is_full else cfg.policy.threshold
    speed = 2.0 - threshold
    num_agree = round(NUM_TOKENS * threshold)
    request = RequestRecord(
        request_id=0, arrival_s=0.0, first_token_s=1.0 / speed,
        finish_s=BASE_DURATION_S / speed, num_prompt_tokens=8, num_output_tokens=NUM_TOKENS,
        exit_layers=(4 if is_full else 2,) * NUM_TOKENS, num_forced_exits=0, num_preemptions=0,
        agreement_flags=(True,) * num_agree + (False,) * (NUM_TOKENS - num_agree),
    )  # fmt: skip
    step = StepRecord(
        start_s=0.0, duration_s=BASE_DURATION_S / speed, num_row_layers_executed=80,
        num_kv_only_row_layers=0, num_blocks_used=3, num_preempted=0,
    )  # fmt: skip
    return compute_metrics([request], [step])


def fake_run(cfg) -> FakeResult:
    return FakeResult(cfg, fake_metrics(cfg))


def softmax_fails(cfg) -> FakeResult:
    """Like fake_run, but every early-exit run with the softmax rule fails."""
    if cfg.policy.batching != "full" and cfg.policy.exit_rule == "softmax":
        raise SimulationError("the trace has no softmax signals")
    return fake_run(cfg)
