"""Request streams for capture and simulation: transforms, clipping, prompts, workload strings.

A workload is built in two steps: length specs (arrival time, prompt and output token counts) from a
synthetic process or a trace file (`testbed.workload_files`), then prompts of exactly those lengths
from a data set (or random token ids). Every random choice comes from a numpy Generator seeded by
the caller.

Workload strings (`--workload KIND:KEY=VALUE,...`). Token counts are fixed (`128`) or uniform over
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

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from testbed.errors import WorkloadError
from testbed.workload_files import (
    LengthSpec,
    check_stream,
    read_azure_csv,
    read_length_csv,
    read_mooncake_jsonl,
    resolve_path,
    synthetic_arrivals,
)

log = logging.getLogger(__name__)

MIN_TOKEN_ID = 3  # ids 0-2 are pad/bos/eos (built-in tokenizer) or unk/bos/eos (Llama)
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
class Request:
    """One request of a stream, ready for the scheduler."""

    arrival_s: float  # seconds after the stream starts
    prompt_token_ids: tuple[int, ...]  # exactly the spec's prompt length
    max_tokens: int  # output tokens to generate (the spec's output length)
    request_id: int  # position in the stream; equal arrivals break ties by it
    source_index: int | None  # data set item (the first, if texts were joined); None if synthetic
    ignore_eos: bool = False  # run to max_tokens past an end-of-sequence token (LengthSpec's)


@dataclass(frozen=True)
class ClipReport:
    """What `clip_lengths` changed, so the caller can report it."""

    num_requests: int  # requests seen
    num_prompts_clipped: int  # prompt lengths changed
    num_outputs_clipped: int  # output lengths changed
    num_requests_clipped: int  # requests with either length changed


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


# ---- transforms --------------------------------------------------------------------------------


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


# ---- prompts -----------------------------------------------------------------------------------


def _check_lengths(spec: LengthSpec, index: int) -> None:
    if spec.num_prompt_tokens < 1 or spec.num_output_tokens < 1:
        raise WorkloadError(
            f"request {index} has an empty prompt or output (run clip_lengths first)"
        )


class _TextCycle:
    """Texts in a seeded shuffled order, encoded on first use and handed out round the cycle."""

    def __init__(self, texts: Sequence[str], encode: Callable[[str], list[int]], seed: int):
        if not texts:
            raise WorkloadError("no texts to draw prompts from")
        self._texts, self._encode = texts, encode
        self._order = np.random.default_rng(seed).permutation(len(texts)).tolist()
        self._cursor = 0  # position in _order of the next text to try
        self._ids: dict[int, list[int]] = {}  # text index -> its token ids
        self._max_len: int | None = None  # longest encoding, known once every text is encoded

    def _encoded(self, pos: int) -> list[int]:
        index = self._order[pos % len(self._order)]
        if index not in self._ids:
            self._ids[index] = list(self._encode(self._texts[index]))
            if len(self._ids) == len(self._texts):
                self._max_len = max(len(ids) for ids in self._ids.values())
        return self._ids[index]

    def draw(self, num_tokens: int) -> tuple[tuple[int, ...], int]:
        """Exactly `num_tokens` ids, and the index of the (first) text they come from."""
        n = len(self._order)
        if self._max_len is None or self._max_len >= num_tokens:
            for step in range(n):  # the next text in the cycle that is long enough
                pos = (self._cursor + step) % n
                if len(self._encoded(pos)) >= num_tokens:
                    self._cursor = (pos + 1) % n
                    return tuple(self._encoded(pos)[:num_tokens]), self._order[pos]
        # none is: the scan above encoded every text, so _max_len is known
        if not self._max_len:
            raise WorkloadError("every text encodes to zero tokens")
        first, ids = self._cursor, []
        while len(ids) < num_tokens:  # join successive texts in cycle order
            ids.extend(self._encoded(self._cursor))
            self._cursor = (self._cursor + 1) % n
        return tuple(ids[:num_tokens]), self._order[first]


def attach_prompts(
    specs: Sequence[LengthSpec],
    texts: Sequence[str],
    encode: Callable[[str], list[int]],
    *,
    seed: int,
) -> list[Request]:
    """Requests whose prompts are data set texts cut to each spec's length; deterministic per seed.
    A spec takes the next text (in a seeded shuffled cycle) that is long enough; when no text is,
    successive texts are joined."""
    cycle = _TextCycle(texts, encode, seed)
    out = []
    for i, s in enumerate(specs):
        _check_lengths(s, i)
        ids, source = cycle.draw(s.num_prompt_tokens)
        out.append(Request(s.arrival_s, ids, s.num_output_tokens, i, source, s.ignore_eos))
    return out


def synthetic_prompts(specs: Sequence[LengthSpec], vocab_size: int, seed: int) -> list[Request]:
    """Requests with uniformly random prompt ids in [MIN_TOKEN_ID, vocab_size), for runs without
    a data set; source_index is None."""
    if vocab_size <= MIN_TOKEN_ID:
        raise WorkloadError(f"vocab_size must exceed {MIN_TOKEN_ID}, got {vocab_size}")
    rng = np.random.default_rng(seed)
    out = []
    for i, s in enumerate(specs):
        _check_lengths(s, i)
        ids = rng.integers(MIN_TOKEN_ID, vocab_size, s.num_prompt_tokens)
        out.append(Request(s.arrival_s, tuple(ids.tolist()), s.num_output_tokens, i, None,
                           ignore_eos=s.ignore_eos))  # fmt: skip
    return out


# ---- workload strings --------------------------------------------------------------------------


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
