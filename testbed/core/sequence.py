"""Request/sequence state: token lists, counters and an ordered status enum.

A sequence moves WAITING → RUNNING ⇄ PARKED → FINISHED, and RUNNING → WAITING on preemption.
Positions [0, num_computed_tokens) have K/V in the cache. While decoding, exactly the last token
(position num_tokens - 1) has not been fed yet: it is the input of the next decode row.
"""

import enum
from dataclasses import dataclass, field


class SequenceStatus(enum.IntEnum):
    """Lifecycle stage; ordered so that `status >= FINISHED` style comparisons read naturally."""

    WAITING = enum.auto()  # queued for (re)prefill; owns no KV blocks
    RUNNING = enum.auto()  # admitted: prefilling in chunks or decoding one token per step
    PARKED = enum.auto()  # a rebatch row stopped at an exit point, waiting for a deep batch
    FINISHED = enum.auto()  # hit max_tokens or EOS; its blocks are freed


class FinishReason(enum.Enum):
    """Why a sequence stopped generating."""

    LENGTH = "length"  # produced max_tokens tokens
    EOS = "eos"  # produced the end-of-sequence token


@dataclass(eq=False, kw_only=True)
class Sequence:
    """One request's mutable state; compared by identity, as sequences are tracked by id."""

    seq_id: int  # increasing with arrival; every tie in the scheduler breaks by it
    prompt_token_ids: tuple[int, ...]  # the request's prompt
    max_tokens: int  # most output tokens to generate
    arrival_s: float = 0.0  # arrival time on the run's clock (offline runs: all arrive at 0)
    eos_token_id: int | None = None  # generation stops after this token; None: length only
    output_token_ids: list[int] = field(default_factory=list)  # generated so far
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # positions [0, n) have K/V in the cache
    # True once the current (re)prefill has fed every token; preemption resets it. Needed because a
    # one-token final prefill chunk looks like a decode row by its counters alone.
    is_prefill_done: bool = False
    block_table: list[int] = field(default_factory=list)  # KV block ids, in position order
    num_preemptions: int = 0  # times this sequence was preempted by recompute
    parked_layer: int | None = None  # exit point where a rebatch row was parked; None: not parked
    parked_since_step: int | None = None  # step id in which it was parked; None: not parked
    finish_reason: FinishReason | None = None  # set together with status FINISHED

    def __post_init__(self) -> None:
        # Accept any iterable for convenience; the prompt is immutable from here on.
        self.prompt_token_ids = tuple(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus outputs: the length a recompute prefill has to feed."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> tuple[int, ...]:
        return self.prompt_token_ids + tuple(self.output_token_ids)

    def token_ids_between(self, start: int, end: int) -> tuple[int, ...]:
        """all_token_ids[start:end] without building the whole tuple (a decode row feeds one)."""
        num_prompt = len(self.prompt_token_ids)
        if start >= num_prompt:
            return tuple(self.output_token_ids[start - num_prompt : end - num_prompt])
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + tuple(self.output_token_ids[: end - num_prompt])

    @property
    def last_token_id(self) -> int:
        """The newest token: the input of the next decode row."""
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        """Record a sampled token; finish on EOS (checked first) or on reaching max_tokens."""
        # the status test inlined: a simulation appends a million tokens
        assert self.status is not SequenceStatus.FINISHED, (
            f"seq {self.seq_id}: token appended after it finished"
        )
        self.output_token_ids.append(token_id)
        if self.eos_token_id is not None and token_id == self.eos_token_id:
            self._finish(FinishReason.EOS)
        elif len(self.output_token_ids) >= self.max_tokens:
            self._finish(FinishReason.LENGTH)

    def extend_tokens(self, token_ids: list[int]) -> None:
        """append_token for each of token_ids, one steady stretch at once: only the last may
        finish the sequence (the caller ends a stretch at its first EOS or at max_tokens)."""
        assert self.status is not SequenceStatus.FINISHED, (
            f"seq {self.seq_id}: tokens appended after it finished"
        )
        out, eos = self.output_token_ids, self.eos_token_id
        assert len(out) + len(token_ids) <= self.max_tokens, f"seq {self.seq_id}: past max_tokens"
        assert eos is None or eos not in token_ids[:-1], f"seq {self.seq_id}: tokens past EOS"
        out.extend(token_ids)
        if eos is not None and token_ids and token_ids[-1] == eos:
            self._finish(FinishReason.EOS)
        elif len(out) >= self.max_tokens:
            self._finish(FinishReason.LENGTH)

    def _finish(self, reason: FinishReason) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
