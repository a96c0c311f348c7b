"""Paged KV-cache block allocation: a free list, per-sequence block tables and their invariants.

Blocks are fixed-size pages of `block_size` token slots. A sequence's block table lists its blocks
in position order, so position p lives in slot block_table[p // block_size] * block_size +
p % block_size. The manager never touches K/V tensors; runners map slots to memory.
"""

import heapq
from collections.abc import Iterable
from collections.abc import Sequence as SequenceABC
from itertools import chain

import numpy as np

from testbed.core.errors import OutOfBlocksError
from testbed.core.sequence import Sequence


def slots_for_positions(
    block_table: SequenceABC[int], block_size: int, start: int, end: int
) -> np.ndarray:
    """Cache slot of every position in [start, end) for a block table; int64, shape [end - start].

    A free function so runners can map a `RowPlan`'s block table without a `BlockManager`.
    """
    assert 0 <= start <= end <= len(block_table) * block_size, (
        f"positions [{start}, {end}) outside the {len(block_table)} blocks of the table"
    )
    positions = np.arange(start, end, dtype=np.int64)  # [end - start]
    table = np.asarray(block_table, dtype=np.int64)  # [num_table_blocks]
    return table[positions // block_size] * block_size + positions % block_size


class BlockManager:
    """Owns the free list; sequences own their block tables.

    The free list is a min-heap, so the lowest free id is always handed out first: allocation
    order depends only on the order of allocate/free calls, which keeps runs reproducible.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be > 0")
        self._num_blocks = num_blocks
        self._block_size = block_size
        self._free_heap: list[int] = list(range(num_blocks))  # sorted ⇒ already a heap

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_heap)

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold positions [0, num_tokens)."""
        assert num_tokens >= 0, f"negative token count {num_tokens}"
        return -(-num_tokens // self._block_size)

    def num_missing_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks seq's table lacks to cover positions [0, num_tokens)."""
        return max(0, self.blocks_needed(num_tokens) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether seq's table can grow to cover positions [0, num_tokens)."""
        return self.num_missing_blocks(seq, num_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow seq's block table to cover positions [0, num_tokens); never shrinks it."""
        num_missing = self.num_missing_blocks(seq, num_tokens)
        if num_missing > self.num_free_blocks:
            raise OutOfBlocksError(
                f"seq {seq.seq_id} needs {num_missing} more blocks, {self.num_free_blocks} free"
            )
        if num_missing:  # most calls (decode steps inside a block) need none
            seq.block_table.extend(heapq.heappop(self._free_heap) for _ in range(num_missing))

    def num_missing_for_decode(self, seqs: Iterable[Sequence]) -> int:
        """Blocks that one more position for each of seqs needs, each covering its computed
        positions already (a decoding sequence's table always does): one per full table."""
        size = self._block_size
        return sum([len(seq.block_table) * size <= seq.num_computed_tokens for seq in seqs])

    def allocate_for_decode(self, seqs: Iterable[Sequence]) -> None:
        """allocate(seq, seq.num_computed_tokens + 1) for each of seqs, in order, after
        num_missing_for_decode(seqs) found enough free blocks."""
        size = self._block_size
        for seq in seqs:
            if len(seq.block_table) * size <= seq.num_computed_tokens:
                seq.block_table.append(heapq.heappop(self._free_heap))

    def decode_block_steps(
        self, seqs: SequenceABC[Sequence], num_steps: int, num_resumes: int = 0
    ) -> list[int]:
        """Per step of num_steps decode steps of seqs (one position more each per step), the
        blocks allocate_for_decode would hand out in it: a row needs one each time its table
        fills, every block_size steps from the first. The first num_resumes rows resume in
        the first step: they feed the position they were parked at, which has its block."""
        counts = [0] * num_steps
        for first in self._first_block_steps(seqs, num_resumes):
            for step in range(first, num_steps, self._block_size):
                counts[step] += 1
        return counts

    def decode_steps_covered(
        self, seqs: SequenceABC[Sequence], num_steps: int, num_resumes: int = 0
    ) -> int:
        """How many of num_steps decode steps of seqs the free blocks cover, from the first."""
        size, num_free = self._block_size, len(self._free_heap)
        firsts = self._first_block_steps(seqs, num_resumes)
        if sum([-(-(num_steps - f) // size) for f in firsts if f < num_steps]) <= num_free:
            return num_steps  # the usual case: all of them, without counting step by step
        for step, num_new in enumerate(self.decode_block_steps(seqs, num_steps, num_resumes)):
            num_free -= num_new
            if num_free < 0:
                return step
        return num_steps

    def allocate_for_decode_steps(
        self, seqs: SequenceABC[Sequence], num_steps: int, num_resumes: int = 0
    ) -> list[int]:
        """allocate_for_decode num_steps times, each row one position further each time, in
        the same order (step, then seq_id: the running order), so each row gets the same
        block ids. Returns decode_block_steps: the blocks each step took."""
        size, needs, counts = self._block_size, [], [0] * num_steps
        for seq, first in zip(seqs, self._first_block_steps(seqs, num_resumes), strict=True):
            if first < num_steps:  # most rows of a short stretch stay inside their last block
                needs.extend((step, seq.seq_id, seq) for step in range(first, num_steps, size))
        if len(needs) > len(self._free_heap):
            raise OutOfBlocksError(f"{num_steps} decode steps need {len(needs)} blocks, "
                                   f"{len(self._free_heap)} free")  # fmt: skip
        for step, _, seq in sorted(needs):  # seq_ids differ: sequences are never compared
            seq.block_table.append(heapq.heappop(self._free_heap))
            counts[step] += 1
        return counts

    def _first_block_steps(self, seqs: SequenceABC[Sequence], num_resumes: int) -> list[int]:
        """Per row, the first decode step that needs a new block (a resume row's positions
        lag one step: it was counted when it parked)."""
        size = self._block_size
        return [len(seq.block_table) * size - seq.num_computed_tokens + (r < num_resumes)
                for r, seq in enumerate(seqs)]  # fmt: skip

    def free(self, seq: Sequence) -> None:
        """Return all of seq's blocks to the free list and clear its table."""
        for block_id in seq.block_table:
            heapq.heappush(self._free_heap, block_id)
        seq.block_table.clear()

    def slot_mapping(self, seq: Sequence, start: int, end: int) -> np.ndarray:
        """Cache slot of each position in [start, end) of seq; int64, shape [end - start]."""
        return slots_for_positions(seq.block_table, self._block_size, start, end)

    def check_invariants(self, seqs: Iterable[Sequence]) -> None:
        """Every block is free or owned by exactly one of seqs (all block owners must be passed)."""
        free_ids = set(self._free_heap)
        assert len(free_ids) == len(self._free_heap), "a block is on the free list twice"
        seqs = list(seqs)
        # set operations at C speed (a simulation checks thousands of blocks); a broken block
        # is then named by the walk below
        owned = list(chain.from_iterable(seq.block_table for seq in seqs))
        owned_ids = set(owned)
        in_range = not owned or (min(owned) >= 0 and max(owned) < self._num_blocks)
        if len(owned_ids) != len(owned) or not in_range or not owned_ids.isdisjoint(free_ids):
            _name_broken_block(seqs, free_ids, self._num_blocks)
        assert len(owned_ids) + len(free_ids) == self._num_blocks, (
            f"{len(owned_ids)} owned + {len(free_ids)} free != {self._num_blocks} blocks (leak)"
        )


def _name_broken_block(seqs: list[Sequence], free_ids: set[int], num_blocks: int) -> None:
    """Raise AssertionError naming the first block that is out of range, free and owned, or
    owned twice (two tables, or one table listing it twice, which would alias two positions)."""
    owner_of: dict[int, int] = {}
    for seq in seqs:
        for block_id in seq.block_table:
            assert 0 <= block_id < num_blocks, f"seq {seq.seq_id}: bad block {block_id}"
            assert block_id not in free_ids, f"block {block_id} is free and owned by {seq.seq_id}"
            assert block_id not in owner_of, (
                f"block {block_id} owned by {owner_of[block_id]} and {seq.seq_id}"
            )
            owner_of[block_id] = seq.seq_id
    raise AssertionError("a block is broken, but the walk found none")  # the sets disagree
