"""BlockManager: allocation order, growth, freeing, slot mapping and the ownership invariants."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.core import BlockManager, OutOfBlocksError, Sequence, slots_for_positions


def make_seq(seq_id: int = 0) -> Sequence:
    return Sequence(seq_id=seq_id, prompt_token_ids=(1, 2, 3), max_tokens=4)


def test_blocks_needed_rounds_up() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    assert [manager.blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_rejects_non_positive_sizes() -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        BlockManager(num_blocks=0, block_size=4)
    with pytest.raises(ValueError, match="must be > 0"):
        BlockManager(num_blocks=4, block_size=0)


def test_allocate_hands_out_lowest_free_ids_and_only_grows() -> None:
    manager = BlockManager(num_blocks=6, block_size=2)
    first, second = make_seq(0), make_seq(1)
    manager.allocate(first, 3)
    manager.allocate(second, 2)
    assert first.block_table == [0, 1] and second.block_table == [2]
    manager.allocate(first, 1)  # asking for less never shrinks the table
    assert first.block_table == [0, 1]
    manager.free(first)
    assert first.block_table == [] and manager.num_free_blocks == 5
    manager.allocate(second, 6)  # freed low ids come back first
    assert second.block_table == [2, 0, 1]
    manager.check_invariants([first, second])


def test_out_of_blocks_leaves_state_untouched() -> None:
    manager = BlockManager(num_blocks=2, block_size=2)
    seq = make_seq()
    assert manager.can_allocate(seq, 4) and not manager.can_allocate(seq, 5)
    with pytest.raises(OutOfBlocksError, match="needs 3 more blocks, 2 free"):
        manager.allocate(seq, 5)
    assert seq.block_table == [] and manager.num_free_blocks == 2


def test_slot_mapping_follows_the_block_table() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq()
    seq.block_table.extend([5, 2])  # hand-built so the mapping is not the identity
    slots = manager.slot_mapping(seq, 2, 7)
    assert slots.dtype == np.int64
    assert slots.tolist() == [22, 23, 8, 9, 10]
    assert slots_for_positions((5, 2), 4, 0, 0).tolist() == []
    with pytest.raises(AssertionError, match="outside"):
        manager.slot_mapping(seq, 0, 9)


def test_check_invariants_catches_double_ownership_leaks_and_free_owned() -> None:
    manager = BlockManager(num_blocks=4, block_size=2)
    first, second = make_seq(0), make_seq(1)
    manager.allocate(first, 2)
    manager.allocate(second, 2)
    with pytest.raises(AssertionError, match="leak"):
        manager.check_invariants([first])
    second.block_table.append(first.block_table[0])
    with pytest.raises(AssertionError, match="owned by 0 and 1"):
        manager.check_invariants([first, second])
    second.block_table[-1] = 3  # still on the free list
    with pytest.raises(AssertionError, match="is free and owned"):
        manager.check_invariants([first, second])
    second.block_table[-1] = second.block_table[0]  # listed twice in one table
    with pytest.raises(AssertionError, match="owned by 1 and 1"):
        manager.check_invariants([first, second])
    second.block_table[-1] = 4  # past the last block
    with pytest.raises(AssertionError, match="seq 1: bad block 4"):
        manager.check_invariants([first, second])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 12)), max_size=40))
def test_random_allocate_free_keeps_invariants(ops: list[tuple[int, int]]) -> None:
    manager = BlockManager(num_blocks=10, block_size=3)
    seqs = [make_seq(i) for i in range(4)]
    for index, num_tokens in ops:
        seq = seqs[index]
        if num_tokens == 0:
            manager.free(seq)
        elif manager.can_allocate(seq, num_tokens):
            manager.allocate(seq, num_tokens)
            assert len(seq.block_table) >= manager.blocks_needed(num_tokens)
        else:
            with pytest.raises(OutOfBlocksError):
                manager.allocate(seq, num_tokens)
        manager.check_invariants(seqs)
    for seq in seqs:
        manager.free(seq)
    assert manager.num_free_blocks == 10


@settings(max_examples=200, deadline=None)
@given(
    computed=st.lists(st.integers(1, 20), min_size=1, max_size=5),
    resumed=st.lists(st.booleans(), min_size=5, max_size=5),
    num_blocks=st.integers(6, 30),
    block_size=st.integers(1, 5),
    num_steps=st.integers(0, 25),
)
def test_decode_steps_at_once_equal_one_step_at_a_time(
    computed, resumed, num_blocks, block_size, num_steps
):
    """decode_block_steps, decode_steps_covered and allocate_for_decode_steps do what
    allocate_for_decode does step by step, every row one position further each step, in
    seq_id order; a resume row (listed first) feeds no new position in the first step."""
    is_resume = resumed[: len(computed)]

    def decoding(manager: BlockManager) -> list[Sequence]:
        seqs = [make_seq(i) for i in range(len(computed))]
        for seq, n in zip(seqs, computed, strict=True):
            manager.allocate(seq, n)
            seq.num_computed_tokens = n  # a resume row's counts the position it parked at
        return seqs

    def step_by_step(manager: BlockManager, seqs: list[Sequence], steps: int) -> list[int]:
        taken = []
        for step in range(steps):
            num_free, growing = manager.num_free_blocks, seqs
            if step == 0:
                growing = [seq for seq, k in zip(seqs, is_resume, strict=True) if not k]
            manager.allocate_for_decode(growing)
            taken.append(num_free - manager.num_free_blocks)
            for seq in growing:
                seq.num_computed_tokens += 1
        return taken

    def resumes_first(seqs: list[Sequence]) -> list[Sequence]:
        return sorted(seqs, key=lambda seq: not is_resume[seq.seq_id])

    if sum(-(-n // block_size) for n in computed) > num_blocks:
        return  # the rows' own context does not fit
    plenty = BlockManager(10_000, block_size)
    counts = step_by_step(plenty, decoding(plenty), num_steps)
    many = BlockManager(num_blocks, block_size)
    seqs, num_resumes = resumes_first(decoding(many)), sum(is_resume)
    num_free, covered = many.num_free_blocks, num_steps
    for step, n in enumerate(counts):
        num_free -= n
        if num_free < 0:
            covered = step
            break
    assert many.decode_block_steps(seqs, num_steps, num_resumes) == counts
    assert many.decode_steps_covered(seqs, num_steps, num_resumes) == covered
    assert many.allocate_for_decode_steps(seqs, covered, num_resumes) == counts[:covered]
    one = BlockManager(num_blocks, block_size)
    one_seqs = decoding(one)
    step_by_step(one, one_seqs, covered)
    # the same ids, in the same order
    assert [s.block_table for s in sorted(seqs, key=lambda seq: seq.seq_id)] == [
        s.block_table for s in one_seqs
    ]
    if covered < num_steps:
        with pytest.raises(OutOfBlocksError):
            many.allocate_for_decode_steps(seqs, covered + 1, num_resumes)
