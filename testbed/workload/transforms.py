"""Transforms of length specs: first N, time scaling, rate rescaling, clipping to a context."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from testbed.errors import WorkloadError
from testbed.workload.arrivals import check_stream
from testbed.workload.spec import LengthSpec


@dataclass(frozen=True)
class ClipReport:
    """What `clip_lengths` changed, so the caller can report it."""

    num_requests: int  # requests seen
    num_prompts_clipped: int  # prompt lengths changed
    num_outputs_clipped: int  # output lengths changed
    num_requests_clipped: int  # requests with either length changed


def mean_rate_per_s(specs: Sequence[LengthSpec]) -> float:
    """Gaps per second between the first and the last arrival."""
    if len(specs) < 2:
        raise WorkloadError("a rate needs at least two requests")
    span_s = specs[-1].arrival_s - specs[0].arrival_s
    if span_s <= 0:
        raise WorkloadError("all requests arrive at once: the trace has no rate to rescale")
    return (len(specs) - 1) / span_s


def time_scale(specs: Sequence[LengthSpec], factor: float) -> list[LengthSpec]:
    """Multiply arrival times by `factor` (0.5 replays the trace twice as fast)."""
    if not factor > 0 or math.isinf(factor):
        raise WorkloadError(f"time scale must be a positive number, got {factor}")
    return [replace(s, arrival_s=s.arrival_s * factor) for s in specs]


def rescale_rate(specs: Sequence[LengthSpec], rate_per_s: float) -> list[LengthSpec]:
    """Stretch or squeeze arrival times so that the mean rate equals `rate_per_s`."""
    check_stream(rate_per_s, len(specs))
    return time_scale(specs, mean_rate_per_s(specs) / rate_per_s)


def take(specs: Sequence[LengthSpec], num_requests: int) -> list[LengthSpec]:
    """The first `num_requests` specs; asking for more than there are is an error, not a
    silent shortfall."""
    if num_requests < 1:
        raise WorkloadError(f"number of requests must be at least 1, got {num_requests}")
    if num_requests > len(specs):
        raise WorkloadError(f"asked for {num_requests} requests but the trace has {len(specs)}")
    return list(specs[:num_requests])


def clip_lengths(
    specs: Sequence[LengthSpec],
    *,
    max_model_len: int,
    max_prompt_tokens: int | None = None,
    max_output_tokens: int | None = None,
) -> tuple[list[LengthSpec], ClipReport]:
    """Fit every request in the model: prompt first (leaving room for one output token), then the
    output so that prompt + output <= max_model_len; at least one token each."""
    if max_model_len < 2:
        raise WorkloadError(f"max_model_len must be at least 2, got {max_model_len}")
    for name, cap in (
        ("max_prompt_tokens", max_prompt_tokens),
        ("max_output_tokens", max_output_tokens),
    ):
        if cap is not None and cap < 1:
            raise WorkloadError(f"{name} must be at least 1, got {cap}")
    prompt_cap = min(max_model_len - 1, max_prompt_tokens or max_model_len)
    output_cap = max_output_tokens or max_model_len
    out, num_prompts, num_outputs, num_requests = [], 0, 0, 0
    for s in specs:
        prompt = min(max(s.num_prompt_tokens, 1), prompt_cap)
        output = min(max(s.num_output_tokens, 1), output_cap, max_model_len - prompt)
        num_prompts += prompt != s.num_prompt_tokens
        num_outputs += output != s.num_output_tokens
        num_requests += prompt != s.num_prompt_tokens or output != s.num_output_tokens
        out.append(replace(s, num_prompt_tokens=prompt, num_output_tokens=output))
    return out, ClipReport(len(out), num_prompts, num_outputs, num_requests)


def _check_lengths(spec: LengthSpec, index: int) -> None:
    if spec.num_prompt_tokens < 1 or spec.num_output_tokens < 1:
        raise WorkloadError(
            f"request {index} has an empty prompt or output (run clip_lengths first)"
        )
