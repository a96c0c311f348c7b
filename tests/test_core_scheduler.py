"""Scheduler behaviour on hand-built workloads: limits, chunking, FCFS, preemption, parking."""

from collections.abc import Collection
from dataclasses import dataclass, field

import pytest

from testbed.core import (
    BlockManager,
    InvalidRequestError,
    RequestNeverFitsError,
    RequestTooLongError,
    RowResult,
    Scheduler,
    SchedulerConfig,
    SchedulerConfigError,
    SchedulerStateError,
    Sequence,
    SequenceStatus,
    StepPlan,
    StepResult,
)

NUM_LAYERS = 8


def token_for(seq_id: int, position: int) -> int:
    """The fake model: the token at a position depends only on the sequence and the position."""
    return 100 + seq_id * 10 + position


def run_step(plan: StepPlan, *, park_ids: Collection[int] = (), park_layer: int = 3) -> StepResult:
    """Execute a plan with the fake model; decode rows of park_ids are parked at park_layer."""
    rows = []
    for row in plan.rows:
        is_parked = row.seq_id in park_ids and not row.is_prefill and not row.is_resume
        token_id = token_for(row.seq_id, row.end_position) if row.is_sampling else None
        if is_parked:
            token_id = None
        rows.append(
            RowResult(
                seq_id=row.seq_id,
                token_id=token_id,
                exit_layer=None if token_id is None else NUM_LAYERS,
                is_forced=False,
                is_parked=is_parked,
                parked_layer=park_layer if is_parked else None,
            )
        )
    return StepResult(
        step_id=plan.step_id,
        rows=tuple(rows),
        num_row_layers_executed=0,
        num_kv_only_row_layers=0,
        num_rule_evals=0,
        num_forced_exits=0,
        duration_s=0.0,
    )


def make_scheduler(
    *, num_blocks: int = 64, block_size: int = 4, resume_policy: object = None, **config: object
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(**config),  # type: ignore[arg-type]
        BlockManager(num_blocks=num_blocks, block_size=block_size),
        resume_policy=resume_policy,  # type: ignore[arg-type]
    )


def seq(seq_id: int, num_prompt_tokens: int, max_tokens: int = 4, **kwargs: object) -> Sequence:
    prompt = tuple(range(1, num_prompt_tokens + 1))
    return Sequence(seq_id=seq_id, prompt_token_ids=prompt, max_tokens=max_tokens, **kwargs)  # type: ignore[arg-type]


def step(scheduler: Scheduler, **run_kwargs: object) -> StepPlan:
    plan = scheduler.schedule()
    scheduler.update(plan, run_step(plan, **run_kwargs))  # type: ignore[arg-type]
    return plan


def rows_of(plan: StepPlan) -> list[tuple[int, int, int]]:
    """(seq_id, start_position, num_tokens) per row."""
    return [(row.seq_id, row.start_position, row.num_tokens) for row in plan.rows]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (dict(max_num_seqs=0), "max_num_seqs must be > 0"),
        (dict(max_num_seqs=8, max_num_batched_tokens=4), "must be >= max_num_seqs"),
        (
            dict(enable_chunked_prefill=False, max_num_seqs=4, max_num_batched_tokens=16),
            ">= max_model_len",
        ),
    ],
)
def test_config_validation(config: dict[str, object], message: str) -> None:
    with pytest.raises(SchedulerConfigError, match=message):
        SchedulerConfig(**config)  # type: ignore[arg-type]


def test_max_num_seqs_limits_admission_fcfs() -> None:
    scheduler = make_scheduler(max_num_seqs=2)
    for seq_id in range(3):
        scheduler.add(seq(seq_id, 3))
    plan = step(scheduler)
    assert rows_of(plan) == [(0, 0, 3), (1, 0, 3)]
    assert (scheduler.num_running, scheduler.num_waiting) == (2, 1)


def test_token_budget_without_chunking_stops_at_first_misfit() -> None:
    scheduler = make_scheduler(
        max_num_seqs=4, max_num_batched_tokens=8, max_model_len=8, enable_chunked_prefill=False
    )
    for seq_id, length in enumerate((5, 4, 1)):
        scheduler.add(seq(seq_id, length, max_tokens=3))
    assert rows_of(step(scheduler)) == [(0, 0, 5)]  # seq 2 would fit but must not overtake
    assert rows_of(step(scheduler)) == [(0, 5, 1), (1, 0, 4), (2, 0, 1)]


def test_chunked_prefill_splits_and_only_the_last_chunk_samples() -> None:
    scheduler = make_scheduler(max_num_seqs=2, max_num_batched_tokens=4, max_model_len=16)
    scheduler.add(seq(0, 10, max_tokens=2))
    scheduler.add(seq(1, 2, max_tokens=2))
    plans = [step(scheduler) for _ in range(4)]
    assert [rows_of(plan) for plan in plans] == [
        [(0, 0, 4)],
        [(0, 4, 4)],
        [(0, 8, 2), (1, 0, 2)],
        [(0, 10, 1), (1, 2, 1)],
    ]
    assert [row.is_sampling for plan in plans[:3] for row in plan.rows] == [0, 0, 1, 1]
    assert [row.is_prefill for row in plans[3].rows] == [False, False]
    assert scheduler.get(0).output_token_ids == [token_for(0, 10), token_for(0, 11)]


def test_decode_rows_go_before_continuing_prefills() -> None:
    scheduler = make_scheduler(max_num_seqs=2, max_num_batched_tokens=4, max_model_len=16)
    scheduler.add(seq(0, 3, max_tokens=8))
    scheduler.add(seq(1, 9, max_tokens=2))
    assert rows_of(step(scheduler)) == [(0, 0, 3), (1, 0, 1)]
    assert rows_of(step(scheduler)) == [(0, 3, 1), (1, 1, 3)]


def test_finishing_frees_blocks_and_reports_reason() -> None:
    scheduler = make_scheduler(num_blocks=8, block_size=2)
    scheduler.add(seq(0, 3, max_tokens=2))
    scheduler.add(seq(1, 3, max_tokens=5, eos_token_id=token_for(1, 4)))
    finished: list[Sequence] = []
    while scheduler.has_unfinished():
        plan = scheduler.schedule()
        finished += scheduler.update(plan, run_step(plan))
    assert [(s.seq_id, s.finish_reason.value) for s in finished] == [(0, "length"), (1, "eos")]  # type: ignore[union-attr]
    assert scheduler.get(1).output_token_ids == [token_for(1, 3), token_for(1, 4)]
    assert scheduler.block_manager.num_free_blocks == 8 and scheduler.num_finished == 2
    assert all(not s.block_table and s.status is SequenceStatus.FINISHED for s in finished)


def test_preemption_recomputes_with_outputs_from_the_front_of_the_queue() -> None:
    scheduler = make_scheduler(num_blocks=4, block_size=2, max_num_seqs=2)
    for seq_id in range(3):
        scheduler.add(seq(seq_id, 3, max_tokens=5))
    step(scheduler)
    step(scheduler)  # both decode into their second block
    victim = scheduler.get(1)
    outputs_before = list(victim.output_token_ids)
    plan = step(scheduler)  # seq 0 needs a third block: the newest running one goes
    assert rows_of(plan) == [(0, 4, 1)] and plan.num_preempted == 1
    assert victim.status is SequenceStatus.WAITING and victim.num_preemptions == 1
    assert victim.block_table == [] and victim.num_computed_tokens == 0
    assert victim.output_token_ids == outputs_before  # kept, to be re-prefilled
    while scheduler.get(0).status is not SequenceStatus.FINISHED:
        step(scheduler)
    plan = step(scheduler)  # seq 1 re-enters ahead of seq 2, feeding prompt + outputs
    recompute = plan.rows[0]
    assert (recompute.seq_id, recompute.is_prefill, recompute.is_sampling) == (1, True, True)
    assert recompute.token_ids == (1, 2, 3, *outputs_before)
    while scheduler.has_unfinished():
        step(scheduler)
    assert scheduler.get(1).output_token_ids == [token_for(1, p) for p in range(3, 8)]


def test_rejected_requests_leave_the_queue_intact() -> None:
    scheduler = make_scheduler(num_blocks=2, block_size=4, max_model_len=16)
    scheduler.add(seq(0, 3))
    bad = [
        (seq(1, 10, max_tokens=7), RequestTooLongError),
        (seq(1, 0), RequestTooLongError),
        (seq(1, 6, max_tokens=3), RequestNeverFitsError),
        (seq(1, 3, max_tokens=0), InvalidRequestError),
        (seq(0, 3), InvalidRequestError),  # seq_id must increase
    ]
    for request, error in bad:
        with pytest.raises(error):
            scheduler.add(request)
    assert scheduler.num_waiting == 1
    scheduler.add(seq(1, 2))
    assert rows_of(step(scheduler)) == [(0, 0, 3), (1, 0, 2)]


def test_schedule_requires_the_previous_plan_to_be_updated() -> None:
    scheduler = make_scheduler()
    assert scheduler.schedule().is_empty and not scheduler.has_unfinished()
    scheduler.add(seq(0, 3))
    plan = scheduler.schedule()
    with pytest.raises(SchedulerStateError):
        scheduler.schedule()
    scheduler.update(plan, run_step(plan))
    with pytest.raises(SchedulerStateError):
        scheduler.update(plan, run_step(plan))


@dataclass
class FakeResumePolicy:
    """Answers from a script and records what it was asked."""

    answers: list[bool]
    calls: list[tuple[int, int]] = field(default_factory=list)

    def should_resume(self, *, num_parked: int, oldest_wait_steps: int) -> bool:
        self.calls.append((num_parked, oldest_wait_steps))
        return self.answers.pop(0)


def test_parked_rows_wait_for_the_gate_then_resume_together() -> None:
    policy = FakeResumePolicy(answers=[False, False, True])
    scheduler = make_scheduler(resume_policy=policy)
    for seq_id in range(3):
        scheduler.add(seq(seq_id, 2, max_tokens=6))
    step(scheduler)
    step(scheduler, park_ids={0})
    parked = scheduler.get(0)
    assert parked.status is SequenceStatus.PARKED and parked.parked_layer == 3
    blocks_held = list(parked.block_table)
    assert rows_of(step(scheduler, park_ids={2})) == [(1, 3, 1), (2, 3, 1)]
    assert rows_of(step(scheduler)) == [(1, 4, 1)]
    plan = step(scheduler)
    assert policy.calls == [(1, 1), (2, 2), (2, 3)]
    assert [(row.seq_id, row.start_layer) for row in plan.rows[:2]] == [(0, 3), (2, 3)]
    assert rows_of(plan) == [(0, 2, 1), (2, 3, 1), (1, 5, 1)]
    assert parked.status is SequenceStatus.RUNNING and parked.parked_layer is None
    assert parked.block_table == blocks_held and parked.num_computed_tokens == 3
    assert parked.output_token_ids == [token_for(0, 2), token_for(0, 3)]


def test_parked_rows_resume_at_once_without_a_policy_or_when_nothing_else_runs() -> None:
    for policy in (None, FakeResumePolicy(answers=[False])):
        scheduler = make_scheduler(resume_policy=policy)
        scheduler.add(seq(0, 2, max_tokens=3))
        step(scheduler)
        step(scheduler, park_ids={0})
        plan = step(scheduler)
        assert [(row.seq_id, row.start_layer) for row in plan.rows] == [(0, 3)]


def test_parked_rows_are_never_preempted_and_an_idle_step_forces_a_resume() -> None:
    policy = FakeResumePolicy(answers=[False, False])
    scheduler = make_scheduler(num_blocks=3, block_size=2, resume_policy=policy)
    scheduler.add(seq(0, 2, max_tokens=4))
    scheduler.add(seq(1, 1, max_tokens=3))
    step(scheduler)  # seq 0 takes block 0, seq 1 block 1
    step(scheduler, park_ids={1})  # seq 0 takes block 2; seq 1 parks holding block 1
    assert rows_of(step(scheduler)) == [(0, 3, 1)]  # gate says no
    plan = step(scheduler)  # seq 0 needs a 4th block: only itself may go, not the parked row
    assert plan.num_preempted == 1 and scheduler.get(0).status is SequenceStatus.WAITING
    assert [(row.seq_id, row.start_layer) for row in plan.rows] == [(1, 3)]  # gate said no again
    assert policy.calls == [(1, 1), (1, 2)]
    while scheduler.has_unfinished():
        step(scheduler)
    assert scheduler.get(0).output_token_ids == [token_for(0, p) for p in range(2, 6)]
    assert scheduler.get(1).output_token_ids == [token_for(1, p) for p in range(1, 4)]
