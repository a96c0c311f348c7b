"""A workload string to its clipped length specs: the spec parsed, its source read or
generated, its transforms applied."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from testbed.errors import WorkloadError
from testbed.workload.arrivals import synthetic_arrivals
from testbed.workload.readers import (
    read_azure_csv,
    read_length_csv,
    read_mooncake_jsonl,
    resolve_path,
)
from testbed.workload.spec import SYNTHETIC_KINDS, LengthSpec, WorkloadSpec, parse_workload
from testbed.workload.transforms import ClipReport, clip_lengths, rescale_rate, take, time_scale

log = logging.getLogger(__name__)


log = logging.getLogger(__name__)


def _synthetic_lengths(spec: WorkloadSpec, seed: int) -> list[LengthSpec]:
    assert spec.rate_per_s and spec.num_requests and spec.prompt_tokens and spec.output_tokens
    arrivals_s = synthetic_arrivals(spec.rate_per_s, spec.cv, spec.num_requests, seed=seed)
    # a second stream of the same seed, so the arrivals equal poisson_arrivals(rate, n, seed)
    rng = np.random.default_rng([seed, 1])
    prompts = rng.integers(spec.prompt_tokens[0], spec.prompt_tokens[1] + 1, spec.num_requests)
    outputs = rng.integers(spec.output_tokens[0], spec.output_tokens[1] + 1, spec.num_requests)
    return [
        LengthSpec(float(t), int(p), int(o))
        for t, p, o in zip(arrivals_s, prompts, outputs, strict=True)
    ]


def build_lengths(spec: WorkloadSpec, seed: int) -> list[LengthSpec]:
    """The length specs a workload describes, with its eos= rule; trace paths are opened as
    given."""
    return [replace(s, ignore_eos=spec.ignore_eos) for s in _file_or_synthetic(spec, seed)]


def _file_or_synthetic(spec: WorkloadSpec, seed: int) -> list[LengthSpec]:
    if spec.kind in SYNTHETIC_KINDS:
        return _synthetic_lengths(spec, seed)
    if spec.path is None:
        raise WorkloadError(f"{spec.kind} workload needs path=")
    if spec.kind == "lengths":
        assert spec.rate_per_s is not None
        specs = read_length_csv(spec.path, rate_per_s=spec.rate_per_s, cv=spec.cv, seed=seed)
        return take(specs, spec.num_requests) if spec.num_requests else specs
    specs = read_azure_csv(spec.path) if spec.kind == "azure" else read_mooncake_jsonl(spec.path)
    if spec.num_requests:
        specs = take(specs, spec.num_requests)
    if spec.time_scale:
        specs = time_scale(specs, spec.time_scale)
    if spec.rate_per_s:
        specs = rescale_rate(specs, spec.rate_per_s)
    log.info("workload %s: %d requests over %.1f s", spec.kind, len(specs), specs[-1].arrival_s)
    return specs


def workload_lengths(
    workload: str, *, seed: int, max_model_len: int, data_dir: str | None = None
) -> tuple[list[LengthSpec], ClipReport]:
    """A workload string to clipped length specs; ``path=`` resolves against ``data_dir``."""
    spec = parse_workload(workload)
    if spec.path is not None:
        spec = replace(spec, path=str(resolve_path(spec.path, data_dir)))
    return clip_lengths(build_lengths(spec, seed), max_model_len=max_model_len)
