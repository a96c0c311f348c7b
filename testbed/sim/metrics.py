"""What a simulated run measured: request and step records in, one Metrics record out.

Latency percentiles are numpy's default (linear interpolation), so they equal `np.percentile`.
TPOT is a request's mean gap between output tokens after the first, (finish - first token) /
(n - 1); a request with a single output token has no gap and is left out of the TPOT figures.
Throughput counts output tokens over the run's span, first arrival to last finish.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from testbed.sim.errors import SimulationError

LATENCY_STATS = ("mean", "p50", "p90", "p99")


@dataclass(frozen=True)
class RequestRecord:
    """One finished request of a simulated run; times are simulated seconds."""

    request_id: int
    arrival_s: float  # when the request reached the scheduler
    first_token_s: float  # when its first output token was emitted
    finish_s: float  # when its last output token was emitted
    num_prompt_tokens: int
    num_output_tokens: int
    exit_layers: tuple[int, ...]  # 1-based layer each output token came from, in order
    num_forced_exits: int  # tokens the batching policy took before the rule was confident
    num_preemptions: int  # times the scheduler evicted this request's KV blocks
    # per output token: the exit layer's argmax equals the full-depth token (the trace's
    # matches_final); empty when the trace records no flags (a live capture)
    agreement_flags: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        # a record breaking these is a simulator bug, not bad input: fail loudly
        if self.num_output_tokens < 1:
            raise ValueError(f"request {self.request_id}: no output tokens")
        if not self.arrival_s <= self.first_token_s <= self.finish_s:
            raise ValueError(f"request {self.request_id}: times out of order")
        if len(self.exit_layers) != self.num_output_tokens:
            raise ValueError(f"request {self.request_id}: one exit layer per output token")
        if self.agreement_flags and len(self.agreement_flags) != self.num_output_tokens:
            raise ValueError(f"request {self.request_id}: one agreement flag per output token")


class StepRecord(NamedTuple):
    """One engine step of a simulated run (a NamedTuple: the simulator builds one per step)."""

    start_s: float  # simulated time the step began
    duration_s: float  # cost-model time charged for it
    num_row_layers_executed: int  # sum over rows of the layers each ran in full
    num_kv_only_row_layers: int  # row-layers that only computed K/V to fill skipped layers
    num_blocks_used: int  # KV blocks allocated at the end of the step
    num_preempted: int  # sequences preempted to make room in this step


@dataclass(frozen=True, kw_only=True)
class Metrics:
    """Summary of one simulated run (latencies in seconds; None where nothing was measurable)."""

    num_requests: int
    num_output_tokens: int
    num_steps: int
    duration_s: float  # first arrival to last finish
    throughput_tokens_per_s: float  # output tokens per second of duration_s
    throughput_requests_per_s: float
    ttft_mean_s: float  # time to first token: first token - arrival
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    tpot_mean_s: float | None  # None when every request emitted a single token
    tpot_p50_s: float | None
    tpot_p90_s: float | None
    tpot_p99_s: float | None
    e2e_mean_s: float  # end-to-end latency: finish - arrival
    e2e_p50_s: float
    e2e_p90_s: float
    e2e_p99_s: float
    mean_exit_layer: float  # over all output tokens
    num_involuntary_exits: int  # tokens forced out by the batching policy
    num_filled_row_layers: int  # K/V-only row-layers (the KV-fill policy's work)
    num_executed_row_layers: int
    est_agreement: float | None  # fraction of tokens equal to full depth; None without flags
    peak_kv_blocks: int
    num_preemptions: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self) -> str:
        """Aligned text for the CLI: a latency block in milliseconds, then the totals."""
        lines = [f"{'latency (ms)':<14}" + "".join(f"{s:>10}" for s in LATENCY_STATS)]
        for name, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2e", "end-to-end")):
            values = [getattr(self, f"{name}_{stat}_s") for stat in LATENCY_STATS]
            lines.append(f"{label:<14}" + "".join(f"{_ms(v):>10}" for v in values))
        agreement = "-" if self.est_agreement is None else f"{self.est_agreement:.1%}"
        rows = [
            ("requests", f"{self.num_requests} ({self.num_output_tokens} output tokens)"),
            ("duration", f"{self.duration_s:.3f} s ({self.num_steps} steps)"),
            ("throughput", f"{self.throughput_tokens_per_s:.1f} tokens/s"),
            ("", f"{self.throughput_requests_per_s:.3f} requests/s"),
            ("mean exit layer", f"{self.mean_exit_layer:.2f}"),
            ("forced exits", str(self.num_involuntary_exits)),
            ("row-layers", f"{self.num_executed_row_layers} executed"),
            ("", f"{self.num_filled_row_layers} K/V-only (filled)"),
            ("est. agreement", agreement),
            ("peak KV blocks", str(self.peak_kv_blocks)),
            ("preemptions", str(self.num_preemptions)),
        ]
        lines.append("")
        lines += [f"{label:<16}{value}" for label, value in rows]
        return "\n".join(lines)


def _ms(value_s: float | None) -> str:
    return "-" if value_s is None else f"{1e3 * value_s:.2f}"


def latency_stats(values_s: np.ndarray) -> tuple[float, float, float, float] | None:
    """Mean, p50, p90, p99 (numpy's linear percentiles); None for no values."""
    if values_s.size == 0:
        return None
    p50, p90, p99 = np.percentile(values_s, [50, 90, 99])
    return float(values_s.mean()), float(p50), float(p90), float(p99)


def _latency_fields(name: str, values_s: np.ndarray) -> dict[str, float | None]:
    stats = latency_stats(values_s) or (None,) * len(LATENCY_STATS)
    return {f"{name}_{stat}_s": value for stat, value in zip(LATENCY_STATS, stats, strict=True)}


def compute_metrics(requests: Sequence[RequestRecord], steps: Sequence[StepRecord]) -> Metrics:
    """Summarise a run; raises SimulationError when no request finished or no time passed."""
    if not requests:
        raise SimulationError("no request finished, so there is nothing to measure")
    arrival_s = np.array([r.arrival_s for r in requests], dtype=np.float64)
    first_s = np.array([r.first_token_s for r in requests], dtype=np.float64)
    finish_s = np.array([r.finish_s for r in requests], dtype=np.float64)
    num_out = np.array([r.num_output_tokens for r in requests], dtype=np.int64)
    duration_s = float(finish_s.max() - arrival_s.min())
    if duration_s <= 0:
        raise SimulationError("the run took no simulated time: check the cost model")
    has_gap = num_out >= 2
    tpot_s = (finish_s[has_gap] - first_s[has_gap]) / (num_out[has_gap] - 1)
    # means as exact integer sums over a division, the value numpy's means give, without
    # building arrays of every token (an hour holds millions)
    num_tokens = int(num_out.sum())  # one exit layer per output token (RequestRecord checks)
    sum_exit_layers = sum(map(sum, (r.exit_layers for r in requests)))
    mean_exit_layer = sum_exit_layers / num_tokens if num_tokens else float("nan")
    num_flags = sum(map(len, (r.agreement_flags for r in requests)))
    num_agree = sum(map(sum, (r.agreement_flags for r in requests)))
    return Metrics(
        num_requests=len(requests),
        num_output_tokens=num_tokens,
        num_steps=len(steps),
        duration_s=duration_s,
        throughput_tokens_per_s=float(num_out.sum()) / duration_s,
        throughput_requests_per_s=len(requests) / duration_s,
        **_latency_fields("ttft", first_s - arrival_s),
        **_latency_fields("tpot", tpot_s),
        **_latency_fields("e2e", finish_s - arrival_s),
        mean_exit_layer=mean_exit_layer,
        num_involuntary_exits=sum(r.num_forced_exits for r in requests),
        num_filled_row_layers=sum(s.num_kv_only_row_layers for s in steps),
        num_executed_row_layers=sum(s.num_row_layers_executed for s in steps),
        est_agreement=num_agree / num_flags if num_flags else None,
        peak_kv_blocks=max((s.num_blocks_used for s in steps), default=0),
        num_preemptions=sum(r.num_preemptions for r in requests),
    )
