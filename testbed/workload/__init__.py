"""Request streams for capture and simulation, in two steps: length specs (arrival time, prompt
and output token counts) from a synthetic process or a trace file, then prompts of exactly those
lengths from a data set (or random token ids). Every random choice comes from a numpy Generator
seeded by the caller.

spec (workload strings) -> readers (trace files) / arrivals (Poisson, Gamma) -> transforms
(first N, time scale, rate, clipping) -> lengths (the whole path) -> prompts.
"""

from testbed.workload.lengths import build_lengths, workload_lengths
from testbed.workload.prompts import Request, attach_prompts, synthetic_prompts
from testbed.workload.readers import read_azure_csv, read_mooncake_jsonl, resolve_path
from testbed.workload.spec import LengthSpec, WorkloadSpec, parse_workload
from testbed.workload.transforms import ClipReport, clip_lengths

__all__ = [
    "ClipReport",
    "LengthSpec",
    "Request",
    "WorkloadSpec",
    "attach_prompts",
    "build_lengths",
    "clip_lengths",
    "parse_workload",
    "read_azure_csv",
    "read_mooncake_jsonl",
    "resolve_path",
    "synthetic_prompts",
    "workload_lengths",
]
