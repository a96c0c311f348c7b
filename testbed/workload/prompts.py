"""Prompts of exactly the specs' lengths: cut from a data set's texts, or random token ids."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from testbed.errors import WorkloadError
from testbed.workload.spec import LengthSpec
from testbed.workload.transforms import _check_lengths

MIN_TOKEN_ID = 3  # ids 0-2 are pad/bos/eos (built-in tokenizer) or unk/bos/eos (Llama)


@dataclass(frozen=True)
class Request:
    """One request of a stream, ready for the scheduler."""

    arrival_s: float  # seconds after the stream starts
    prompt_token_ids: tuple[int, ...]  # exactly the spec's prompt length
    max_tokens: int  # output tokens to generate (the spec's output length)
    request_id: int  # position in the stream; equal arrivals break ties by it
    source_index: int | None  # data set item (the first, if texts were joined); None if synthetic
    ignore_eos: bool = False  # run to max_tokens past an end-of-sequence token (LengthSpec's)


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
