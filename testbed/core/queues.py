"""Where each sequence is: the waiting, running, parked and finished collections.

Every move between collections goes through one method here that also sets the status, so the
invariant "a sequence is in exactly one collection, and its status names it" holds by construction
and `check_invariants` can verify it.
"""

import bisect
from collections import deque
from collections.abc import Iterator

from testbed.core.sequence import Sequence, SequenceStatus


def _by_seq_id(seq: Sequence) -> int:
    return seq.seq_id


class SequenceQueues:
    """Waiting is a FIFO (preempted sequences re-enter at the front); running and parked are kept
    sorted by seq_id, i.e. by arrival, so iteration order is FCFS and deterministic."""

    def __init__(self) -> None:
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # sorted by seq_id
        self._parked: list[Sequence] = []  # sorted by seq_id
        self._finished: dict[int, Sequence] = {}  # in finishing order
        self._by_id: dict[int, Sequence] = {}  # every sequence ever added

    @property
    def waiting(self) -> tuple[Sequence, ...]:
        return tuple(self._waiting)

    @property
    def running(self) -> tuple[Sequence, ...]:
        return tuple(self._running)

    @property
    def parked(self) -> tuple[Sequence, ...]:
        return tuple(self._parked)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_parked(self) -> int:
        return len(self._parked)

    @property
    def num_finished(self) -> int:
        return len(self._finished)

    @property
    def num_in_flight(self) -> int:
        """Admitted and unfinished: what max_num_seqs bounds."""
        return len(self._running) + len(self._parked)

    def has_unfinished(self) -> bool:
        """Anything waiting, running or parked."""
        return bool(self._waiting or self._running or self._parked)

    @property
    def next_waiting(self) -> Sequence | None:
        return self._waiting[0] if self._waiting else None

    def get(self, seq_id: int) -> Sequence:
        return self._by_id[seq_id]

    def contains(self, seq_id: int) -> bool:
        return seq_id in self._by_id

    def block_owners(self) -> Iterator[Sequence]:
        """Sequences that may hold KV blocks (waiting and finished ones hold none)."""
        yield from self._running
        yield from self._parked

    def add_waiting(self, seq: Sequence) -> None:
        self._by_id[seq.seq_id] = seq
        self._waiting.append(seq)
        seq.status = SequenceStatus.WAITING

    def admit_next(self) -> Sequence:
        seq = self._waiting.popleft()
        self._insert_running(seq)
        return seq

    def preempt(self, seq: Sequence) -> None:
        # Front of the queue: it was admitted before anything still waiting.
        self._running.remove(seq)
        self._waiting.appendleft(seq)
        seq.status = SequenceStatus.WAITING

    def park(self, seq: Sequence) -> None:
        self._running.remove(seq)
        bisect.insort(self._parked, seq, key=_by_seq_id)
        seq.status = SequenceStatus.PARKED

    def resume(self, seq: Sequence) -> None:
        self._parked.remove(seq)
        self._insert_running(seq)

    def finish(self, seq: Sequence) -> None:
        self._running.remove(seq)
        self._finished[seq.seq_id] = seq
        seq.status = SequenceStatus.FINISHED

    def _insert_running(self, seq: Sequence) -> None:
        bisect.insort(self._running, seq, key=_by_seq_id)
        seq.status = SequenceStatus.RUNNING

    def check_invariants(self) -> None:
        """Each sequence sits in exactly one collection, whose status it carries."""
        collections = (
            (SequenceStatus.WAITING, list(self._waiting)),
            (SequenceStatus.RUNNING, self._running),
            (SequenceStatus.PARKED, self._parked),
        )  # finished sequences never move again; they are checked as they arrive (finish())
        seen: set[int] = set()
        for status, seqs in collections:
            for seq in seqs:
                assert seq.status is status, (
                    f"seq {seq.seq_id} is {seq.status.name} in {status.name}"
                )
                assert seq.seq_id not in seen and seq.seq_id not in self._finished, (
                    f"seq {seq.seq_id} is in two collections"
                )
                seen.add(seq.seq_id)
        assert len(seen) + len(self._finished) == len(self._by_id), "a sequence is in no collection"
        for sorted_seqs in (self._running, self._parked):
            ids = [seq.seq_id for seq in sorted_seqs]
            assert ids == sorted(ids), "running/parked lost their seq_id order"
