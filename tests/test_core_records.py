"""Sequence state transitions and the step records' derived values and guards."""

import pytest

from testbed.core import (
    FinishReason,
    RowPlan,
    RowResult,
    Sequence,
    SequenceStatus,
    StepPlan,
    StepResult,
)


def test_status_is_ordered() -> None:
    order = [SequenceStatus.WAITING, SequenceStatus.RUNNING, SequenceStatus.PARKED]
    assert order + [SequenceStatus.FINISHED] == sorted(SequenceStatus)


def test_sequence_counts_and_finishes_on_length() -> None:
    seq = Sequence(seq_id=3, prompt_token_ids=[4, 5], max_tokens=2)
    assert seq.prompt_token_ids == (4, 5) and seq.last_token_id == 5
    seq.append_token(9)
    assert (seq.num_tokens, seq.num_output_tokens, seq.all_token_ids) == (3, 1, (4, 5, 9))
    assert not seq.is_finished and seq.last_token_id == 9
    seq.append_token(9)
    assert seq.is_finished and seq.finish_reason is FinishReason.LENGTH
    with pytest.raises(AssertionError, match="after it finished"):
        seq.append_token(1)


def test_sequence_finishes_on_eos_first() -> None:
    seq = Sequence(seq_id=0, prompt_token_ids=(1,), max_tokens=1, eos_token_id=7)
    seq.append_token(7)
    assert seq.status is SequenceStatus.FINISHED and seq.finish_reason is FinishReason.EOS


def test_extend_tokens_is_append_token_for_each_and_only_the_last_may_finish() -> None:
    seq = Sequence(seq_id=0, prompt_token_ids=(1,), max_tokens=5, eos_token_id=7)
    seq.extend_tokens([2, 3])
    assert seq.output_token_ids == [2, 3] and not seq.is_finished
    seq.extend_tokens([])  # a row that parked in a stretch's only step
    assert not seq.is_finished
    seq.extend_tokens([4, 7])
    assert seq.finish_reason is FinishReason.EOS and seq.output_token_ids == [2, 3, 4, 7]
    longer = Sequence(seq_id=1, prompt_token_ids=(1,), max_tokens=3, eos_token_id=7)
    with pytest.raises(AssertionError, match="past EOS"):
        longer.extend_tokens([7, 2])
    with pytest.raises(AssertionError, match="past max_tokens"):
        longer.extend_tokens([1, 2, 3, 4])
    longer.extend_tokens([1, 2, 3])
    assert longer.finish_reason is FinishReason.LENGTH


def row(**overrides: object) -> RowPlan:
    fields: dict[str, object] = dict(
        seq_id=0,
        token_ids=(1, 2, 3),
        start_position=4,
        is_prefill=True,
        is_sampling=False,
        start_layer=0,
        block_table=(0, 1),
    )
    return RowPlan(**(fields | overrides))  # type: ignore[arg-type]


def test_step_plan_derived_counts() -> None:
    chunk = row()
    decode = row(seq_id=1, token_ids=(9,), start_position=6, is_prefill=False, is_sampling=True)
    resume = row(
        seq_id=2,
        token_ids=(8,),
        start_position=2,
        is_prefill=False,
        is_sampling=True,
        start_layer=3,
    )
    plan = StepPlan(step_id=0, rows=(chunk, decode, resume), num_preempted=0)
    assert chunk.positions == range(4, 7) and chunk.num_tokens == 3
    assert (plan.num_prefill_tokens, plan.num_decode_rows, plan.num_resume_rows) == (3, 2, 1)
    assert plan.num_context_tokens == 7 + 7 + 3 and plan.num_fed_tokens == 5
    assert not plan.is_empty and StepPlan(step_id=1, rows=(), num_preempted=0).is_empty


def test_row_plan_guards() -> None:
    with pytest.raises(AssertionError):
        row(token_ids=())
    with pytest.raises(AssertionError):
        row(start_layer=2)  # a resume row carries one non-prefill sampling token
    with pytest.raises(AssertionError):
        row(is_prefill=False, is_sampling=True)  # a decode row feeds one token


def test_result_guards() -> None:
    parked = RowResult(
        seq_id=0, token_id=None, exit_layer=None, is_forced=False, is_parked=True, parked_layer=2
    )
    assert parked.is_parked
    with pytest.raises(AssertionError):
        RowResult(
            seq_id=0, token_id=5, exit_layer=4, is_forced=False, is_parked=True, parked_layer=2
        )
    with pytest.raises(AssertionError):
        RowResult(
            seq_id=0,
            token_id=5,
            exit_layer=None,
            is_forced=False,
            is_parked=False,
            parked_layer=None,
        )
    with pytest.raises(AssertionError):
        StepResult(
            step_id=0,
            rows=(),
            num_row_layers_executed=-1,
            num_kv_only_row_layers=0,
            num_rule_evals=0,
            num_forced_exits=0,
            duration_s=0.0,
        )
