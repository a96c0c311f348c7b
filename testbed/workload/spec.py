"""Workload strings (`--workload KIND:KEY=VALUE,...`). Token counts are fixed (`128`) or uniform over
an inclusive range (`64-512`); prompt defaults to 128 and output to 64:
  poisson:rate=R,n=N[,prompt=P][,output=O]       Poisson arrivals at R requests/s
  gamma:rate=R,cv=C,n=N[,prompt=P][,output=O]    Gamma gaps with coefficient of variation C
  azure:path=FILE[,n=N][,scale=F|rate=R]         Azure LLM inference CSV, first N, time-scaled
  mooncake:path=FILE[,n=N][,scale=F|rate=R]      Mooncake-style JSONL, likewise
  lengths:path=FILE,rate=R[,cv=C][,n=N]          length-only CSV with synthetic arrivals
Every kind also takes `eos=stop|ignore`: whether a request ends at the model's end-of-sequence
token (`stop`: the output length is a cap) or runs to its output length (`ignore`). Synthetic
kinds default to `stop` (a summary ends where the model ends it); trace replays to `ignore`,
since the lengths in a trace are what its users got: a replay that stopped early would offer
less load than the trace, and by an amount that depends on the policy under test.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from testbed.errors import WorkloadError


@dataclass(frozen=True)
class LengthSpec:
    """One request as a trace file gives it, before a prompt is attached."""

    arrival_s: float  # seconds after the first request of the trace (or of the stream)
    num_prompt_tokens: int  # prompt (prefill) length
    num_output_tokens: int  # tokens to generate
    # True: generate exactly num_output_tokens even past an end-of-sequence token (a trace
    # replay's lengths are what its users got); False: num_output_tokens is a cap
    ignore_eos: bool = False


DEFAULT_PROMPT_TOKENS = (128, 128)


DEFAULT_OUTPUT_TOKENS = (64, 64)


# kind -> (required keys, optional keys)
KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "poisson": (("rate", "n"), ("prompt", "output", "eos")),
    "gamma": (("rate", "cv", "n"), ("prompt", "output", "eos")),
    "azure": (("path",), ("n", "scale", "rate", "eos")),
    "mooncake": (("path",), ("n", "scale", "rate", "eos")),
    "lengths": (("path", "rate"), ("cv", "n", "eos")),
}


SYNTHETIC_KINDS = ("poisson", "gamma")  # the rest replay lengths from a file


EOS_MODES = {"stop": False, "ignore": True}  # eos= value -> LengthSpec.ignore_eos


@dataclass(frozen=True)
class WorkloadSpec:
    """A parsed workload string; fields a kind does not take are None."""

    kind: str  # a key of KINDS
    num_requests: int | None = None  # how many to generate, or the first N of a file (None: all)
    rate_per_s: float | None = None  # arrival rate (synthetic), or the rate to rescale a trace to
    cv: float | None = None  # coefficient of variation of Gamma gaps (None: Poisson)
    prompt_tokens: tuple[int, int] | None = None  # inclusive range of synthetic prompt lengths
    output_tokens: tuple[int, int] | None = None  # inclusive range of synthetic output lengths
    path: str | None = None  # trace file, as given (see resolve_path)
    time_scale: float | None = None  # multiplies a trace's arrival times (0.5: twice as fast)
    ignore_eos: bool = False  # eos=ignore: every request runs to its output length


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError("expected a whole number >= 1")
    return int(text)


def _positive_float(text: str) -> float:
    value = float(text)  # its ValueError says "could not convert string to float: ..."
    if not value > 0 or math.isinf(value):
        raise ValueError("expected a positive number")
    return value


def _token_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition("-")
    low_tokens = _positive_int(low.strip())
    high_tokens = _positive_int(high.strip()) if sep else low_tokens
    if high_tokens < low_tokens:
        raise ValueError("range LOW-HIGH needs LOW <= HIGH")
    return low_tokens, high_tokens


def _eos_mode(text: str) -> bool:
    if text not in EOS_MODES:
        raise ValueError(f"expected one of {', '.join(EOS_MODES)}")
    return EOS_MODES[text]


def _nonempty(text: str) -> str:
    if not text:
        raise ValueError("expected a file path")
    return text


_CONVERTERS: dict[str, Callable[[str], object]] = {
    "rate": _positive_float,
    "cv": _positive_float,
    "scale": _positive_float,
    "n": _positive_int,
    "prompt": _token_range,
    "output": _token_range,
    "path": _nonempty,
    "eos": _eos_mode,
}


# workload-string key -> WorkloadSpec field
_FIELDS = {
    "n": "num_requests",
    "rate": "rate_per_s",
    "cv": "cv",
    "prompt": "prompt_tokens",
    "output": "output_tokens",
    "path": "path",
    "scale": "time_scale",
    "eos": "ignore_eos",
}


def _parse_args(kind: str, args: str) -> dict[str, object]:
    required, optional = KINDS[kind]
    values: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in args.split(","))):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise WorkloadError(
                f"{kind} workload: malformed argument {item!r} (expected KEY=VALUE)"
            )
        if key not in required + optional:
            known = ", ".join(required + optional)
            raise WorkloadError(f"{kind} workload: unknown argument {key!r} (known: {known})")
        if key in values:
            raise WorkloadError(f"{kind} workload: argument {key!r} given twice")
        try:
            values[key] = _CONVERTERS[key](raw.strip())
        except ValueError as exc:
            raise WorkloadError(f"{kind} workload: bad {key}={raw.strip()!r} ({exc})") from None
    missing = [f"{key}=" for key in required if key not in values]
    if missing:
        raise WorkloadError(f"{kind} workload needs {', '.join(missing)}")
    if "scale" in values and "rate" in values:
        raise WorkloadError(f"{kind} workload: give scale= or rate=, not both")
    return values


def parse_workload(text: str) -> WorkloadSpec:
    """`KIND:KEY=VALUE,...` (see the module docstring) into a validated WorkloadSpec."""
    kind, _, args = text.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise WorkloadError(f"unknown workload kind {kind!r} (known: {', '.join(KINDS)})")
    fields = {_FIELDS[key]: value for key, value in _parse_args(kind, args).items()}
    fields.setdefault("ignore_eos", kind not in SYNTHETIC_KINDS)
    if kind in SYNTHETIC_KINDS:
        fields.setdefault("prompt_tokens", DEFAULT_PROMPT_TOKENS)
        fields.setdefault("output_tokens", DEFAULT_OUTPUT_TOKENS)
    return WorkloadSpec(kind=kind, **fields)
