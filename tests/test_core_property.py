"""Whole-run properties of the scheduler under random workloads, driven by a fake model.

The fake model emits a token that depends only on (seq_id, position), so any schedule (chunking,
preemption, parking) must reproduce the outputs of an unconstrained run. It also keeps a fake KV
cache (slot → (seq_id, position)) and checks that every row's context is intact when it runs:
that is what a block-table bug or a missed preemption would break.
"""

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.core import (
    BlockManager,
    RequestNeverFitsError,
    RequestTooLongError,
    RowPlan,
    RowResult,
    Scheduler,
    SchedulerConfig,
    Sequence,
    StepPlan,
    StepResult,
    slots_for_positions,
)

NUM_LAYERS = 6
PARK_LAYER = 2
EOS_TOKEN_ID = 0
MAX_STEPS = 5_000


def token_for(seq_id: int, position: int) -> int:
    return (seq_id * 7 + position * 3) % 13  # hits EOS_TOKEN_ID now and then


@dataclass(frozen=True)
class Request:
    arrival_step: int  # step before which it is added
    num_prompt_tokens: int
    max_tokens: int
    has_eos: bool


@dataclass(frozen=True)
class Workload:
    num_blocks: int
    block_size: int
    config: SchedulerConfig
    requests: tuple[Request, ...]
    park_every: int | None  # park decode rows whose position is a multiple; None: never park
    resume_min_parked: int | None  # gate: resume at this many parked rows; None: no policy
    resume_max_wait_steps: int


@dataclass(frozen=True)
class GatePolicy:
    min_parked: int
    max_wait_steps: int

    def should_resume(self, *, num_parked: int, oldest_wait_steps: int) -> bool:
        return num_parked >= self.min_parked or oldest_wait_steps >= self.max_wait_steps


@dataclass
class FakeModel:
    """Checks what it is fed against the true token streams and its own fake KV cache."""

    block_size: int
    park_every: int | None
    tokens: dict[int, list[int]] = field(default_factory=dict)  # seq_id → known token stream
    cache: dict[int, tuple[int, int]] = field(default_factory=dict)  # slot → (seq_id, position)
    finished: list[int] = field(default_factory=list)  # seq_ids in the order steps finish them

    def run(self, plan: StepPlan) -> StepResult:
        rows = tuple(self._run_row(row) for row in plan.rows)
        return StepResult(
            step_id=plan.step_id,
            rows=rows,
            num_row_layers_executed=0,
            num_kv_only_row_layers=0,
            num_rule_evals=0,
            num_forced_exits=0,
            duration_s=0.0,
        )

    def _run_row(self, row: RowPlan) -> RowResult:
        stream = self.tokens[row.seq_id]
        assert list(row.token_ids) == stream[row.start_position : row.end_position]
        self._check_and_write_cache(row)
        is_parked = (
            self.park_every is not None
            and not row.is_prefill
            and not row.is_resume
            and row.start_position % self.park_every == 0
        )
        token_id = None
        if row.is_sampling and not is_parked:
            token_id = token_for(row.seq_id, row.end_position)
            if len(stream) == row.end_position:  # a recompute re-derives a known token
                stream.append(token_id)
        return RowResult(
            seq_id=row.seq_id,
            token_id=token_id,
            exit_layer=None if token_id is None else NUM_LAYERS,
            is_forced=False,
            is_parked=is_parked,
            parked_layer=PARK_LAYER if is_parked else None,
        )

    def run_stretch(self, scheduler: Scheduler, seqs: tuple[Sequence, ...], max_steps: int) -> int:
        """run() and update() for up to max_steps steady steps at once, through
        Scheduler.steady_horizon and apply_steady_steps, ending as a simulator's stretch ends:
        with the first step that parks a row or emits a row's EOS. The same checks of each
        row's context, then each fed position's K/V written where its grown table says.
        Returns the steps taken."""
        starts = [seq.num_tokens - 1 for seq in seqs]  # the position each row feeds first
        for seq, start in zip(seqs, starts, strict=True):
            assert seq.last_token_id == self.tokens[seq.seq_id][start]
            slots = slots_for_positions(seq.block_table, self.block_size, 0, start)
            for p in range(start):
                assert self.cache.get(int(slots[p])) == (seq.seq_id, p), "context lost"
        num_steps, parked = min(max_steps, scheduler.steady_horizon(seqs)), None
        is_resume = [seq.parked_layer is not None for seq in seqs]  # as run(): never re-parks
        for step in range(num_steps):
            is_parked = [self.park_every is not None and (p + step) % self.park_every == 0
                         and not (step == 0 and resume)
                         for p, resume in zip(starts, is_resume, strict=True)]  # fmt: skip
            is_eos = [seq.eos_token_id is not None
                      and token_for(seq.seq_id, p + step + 1) == seq.eos_token_id
                      for seq, p in zip(seqs, starts, strict=True)]  # fmt: skip
            if any(is_parked) or any(is_eos):
                num_steps = step + 1
                parked = [PARK_LAYER if k else None for k in is_parked] if any(is_parked) else None
                break
        tokens = [[token_for(seq.seq_id, p + i + 1)
                   for i in range(num_steps - (parked is not None and parked[r] is not None))]
                  for r, (seq, p) in enumerate(zip(seqs, starts, strict=True))]  # fmt: skip
        self.finished += [
            q.seq_id for q in scheduler.apply_steady_steps(seqs, num_steps, tokens, parked)[0]
        ]
        for seq, start, row_tokens in zip(seqs, starts, tokens, strict=True):
            stream = self.tokens[seq.seq_id]
            for i, token_id in enumerate(row_tokens):
                if len(stream) == start + i + 1:
                    stream.append(token_id)
            if seq.block_table:  # a finished sequence's blocks are free: no one reads its K/V
                slots = slots_for_positions(
                    seq.block_table, self.block_size, start, start + num_steps
                )
                for i in range(num_steps):
                    self.cache[int(slots[i])] = (seq.seq_id, start + i)
        return num_steps

    def _check_and_write_cache(self, row: RowPlan) -> None:
        """The context a row attends to must still hold its own K/V; then write the fed ones."""
        slots = slots_for_positions(row.block_table, self.block_size, 0, row.end_position)
        # A resume row's K/V up to the parked position were written when it parked.
        num_context = row.end_position if row.is_resume else row.start_position
        for pos in range(num_context):
            assert self.cache.get(int(slots[pos])) == (row.seq_id, pos), "context lost"
        if not row.is_resume:
            for pos in row.positions:
                self.cache[int(slots[pos])] = (row.seq_id, pos)


def make_sequence(seq_id: int, request: Request) -> Sequence:
    return Sequence(
        seq_id=seq_id,
        prompt_token_ids=tuple((seq_id + i) % 13 for i in range(request.num_prompt_tokens)),
        max_tokens=request.max_tokens,
        eos_token_id=EOS_TOKEN_ID if request.has_eos else None,
    )


def run_workload(
    workload: Workload, *, use_steady: bool = False, use_stretches: bool = False,
    steps: list[tuple[int, ...]] | None = None,
) -> tuple[dict[int, list[int]], list[StepPlan]]:  # fmt: skip
    """Run to completion; returns outputs per accepted seq_id (in the order they finished)
    and every plan. use_steady: take
    Scheduler.apply_steady_steps one step at a time wherever steady_step offers a step;
    use_stretches: as many steps at once as FakeModel.run_stretch takes before the next
    arrival. steps: filled with each step's (seq_id per row), plans and steady steps alike."""
    policy = None
    if workload.resume_min_parked is not None:
        policy = GatePolicy(workload.resume_min_parked, workload.resume_max_wait_steps)
    blocks = BlockManager(workload.num_blocks, workload.block_size)
    scheduler = Scheduler(workload.config, blocks, resume_policy=policy)
    model = FakeModel(block_size=workload.block_size, park_every=workload.park_every)
    pending = list(enumerate(workload.requests))
    accepted: list[int] = []
    plans: list[StepPlan] = []
    step_index = 0
    while step_index < MAX_STEPS:
        while pending and (
            pending[0][1].arrival_step <= step_index or not scheduler.has_unfinished()
        ):
            seq_id, request = pending.pop(0)
            sequence = make_sequence(seq_id, request)
            try:
                scheduler.add(sequence)
            except (RequestTooLongError, RequestNeverFitsError):
                continue
            accepted.append(seq_id)
            model.tokens[seq_id] = list(sequence.prompt_token_ids)
        if not scheduler.has_unfinished() and not pending:
            break
        steady = scheduler.steady_step()
        if (use_steady or use_stretches) and steady is not None:
            max_steps = 1
            if use_stretches:  # a request joins before its arrival step
                max_steps = (
                    max(1, pending[0][1].arrival_step - step_index) if pending else MAX_STEPS
                )
            num_steps = model.run_stretch(scheduler, steady, max_steps)
            if steps is not None:  # resume rows come first, then all run in the running order
                steps.append(tuple(seq.seq_id for seq in steady))
                steps.extend([tuple(sorted(steps[-1]))] * (num_steps - 1))
            step_index += num_steps
            continue
        plan = scheduler.schedule()
        assert not plan.is_empty, "idle step with unfinished work"
        check_plan_limits(plan, scheduler)
        check_steady_prediction(steady, plan, scheduler)
        plans.append(plan)
        if steps is not None:
            steps.append(tuple(row.seq_id for row in plan.rows))
        model.finished += [seq.seq_id for seq in scheduler.update(plan, model.run(plan))]
        step_index += 1
    assert not scheduler.has_unfinished() and not pending, "did not finish in time"
    assert blocks.num_free_blocks == workload.num_blocks
    assert sorted(model.finished) == sorted(accepted)
    # in the order steps finished them
    return {seq_id: scheduler.get(seq_id).output_token_ids for seq_id in model.finished}, plans


def check_steady_prediction(
    steady: tuple[Sequence, ...] | None, plan: StepPlan, scheduler: Scheduler
) -> None:
    """steady_step offers exactly the steps schedule() plans as one decode row of every running
    sequence, after a resume row of every parked one or of none (they may wait), with no
    preemption and nothing else."""
    num_resumes = sum(row.is_resume for row in plan.rows)
    is_steady_plan = (
        plan.num_preempted == 0
        and all(not row.is_prefill for row in plan.rows)
        and all(row.is_resume for row in plan.rows[:num_resumes])
        and sorted(row.seq_id for row in plan.rows)
        == [seq.seq_id for seq in scheduler._queues.running]
    )
    if steady is not None:
        assert is_steady_plan and [r.seq_id for r in plan.rows] == [q.seq_id for q in steady]
    else:
        assert not is_steady_plan, "steady_step declined a steady step"


def check_plan_limits(plan: StepPlan, scheduler: Scheduler) -> None:
    config = scheduler.config
    assert plan.num_fed_tokens <= config.max_num_batched_tokens
    assert scheduler.num_running + scheduler.num_parked <= config.max_num_seqs
    assert len({row.seq_id for row in plan.rows}) == len(plan.rows)
    if not config.enable_chunked_prefill:
        for row in plan.rows:
            assert not row.is_prefill or (row.start_position == 0 and row.is_sampling)


def expected_outputs(seq_id: int, request: Request) -> list[int]:
    outputs: list[int] = []
    position = request.num_prompt_tokens
    while len(outputs) < request.max_tokens:
        outputs.append(token_for(seq_id, position))
        position += 1
        if request.has_eos and outputs[-1] == EOS_TOKEN_ID:
            break
    return outputs


@st.composite
def requests(draw: st.DrawFn, max_model_len: int) -> Request:
    # Mostly within max_model_len; sometimes one over, to exercise rejection mid-stream.
    num_prompt_tokens = draw(st.integers(1, max_model_len - 1))
    max_tokens = draw(st.integers(1, max_model_len - num_prompt_tokens + 1))
    return Request(draw(st.integers(0, 6)), num_prompt_tokens, max_tokens, draw(st.booleans()))


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    max_num_seqs = draw(st.integers(1, 5))
    max_model_len = draw(st.integers(2, 40))
    is_chunked = draw(st.booleans())
    min_budget = max_num_seqs if is_chunked else max(max_num_seqs, max_model_len)
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=draw(st.integers(min_budget, min_budget + 24)),
        max_model_len=max_model_len,
        enable_chunked_prefill=is_chunked,
    )
    block_size = draw(st.integers(1, 6))
    # Around the blocks one longest request needs: tight enough to preempt, sometimes too few.
    num_blocks_longest = -(-max_model_len // block_size)
    num_requests = st.lists(requests(max_model_len), min_size=1, max_size=8)
    return Workload(
        num_blocks=draw(st.integers(max(1, num_blocks_longest - 2), 2 * num_blocks_longest)),
        block_size=block_size,
        config=config,
        requests=tuple(sorted(draw(num_requests), key=lambda r: r.arrival_step)),
        park_every=draw(st.sampled_from([None, 2, 3])),
        resume_min_parked=draw(st.sampled_from([None, 1, 2, 4])),
        resume_max_wait_steps=draw(st.integers(1, 6)),
    )


@settings(max_examples=150, deadline=None)
@given(workloads())
def test_random_workloads_finish_and_match_an_unconstrained_run(workload: Workload) -> None:
    outputs, plans = run_workload(workload)
    huge = Workload(
        num_blocks=10_000,
        block_size=workload.block_size,
        config=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=4096, max_model_len=40),
        requests=workload.requests,
        park_every=None,
        resume_min_parked=None,
        resume_max_wait_steps=1,
    )
    reference, _ = run_workload(huge)
    for seq_id, tokens in outputs.items():
        assert tokens == reference[seq_id]
        assert tokens == expected_outputs(seq_id, workload.requests[seq_id])
    assert run_workload(workload)[1] == plans  # deterministic: same calls ⇒ same plans


@settings(max_examples=150, deadline=None)
@given(workloads())
def test_steady_steps_run_the_same_steps_as_schedule_and_update(workload: Workload) -> None:
    """A run that takes apply_steady_steps wherever steady_step offers a step, one step or a
    whole stretch (steady_horizon) at a time, runs the same rows in every step, and the same
    outputs, finished in the same order, as one that plans every step."""
    planned_steps: list[tuple[int, ...]] = []
    outputs, _ = run_workload(workload, steps=planned_steps)
    for mode in ({"use_steady": True}, {"use_stretches": True}):
        steady_steps: list[tuple[int, ...]] = []
        steady_outputs, plans = run_workload(workload, steps=steady_steps, **mode)
        assert steady_outputs == outputs and list(steady_outputs) == list(outputs)
        assert steady_steps == planned_steps


def test_a_decode_stretch_is_steady_until_a_request_arrives_or_finishes() -> None:
    """Two requests decode together; a third arrives at step 6. Only the prefills and the step
    after each change of the running set need plans."""
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=40)
    requests = (Request(0, 5, 12, False), Request(0, 3, 20, False), Request(6, 4, 4, False))
    workload = Workload(num_blocks=40, block_size=4, config=config, requests=requests,
                        park_every=None, resume_min_parked=None, resume_max_wait_steps=1)  # fmt: skip
    steps: list[tuple[int, ...]] = []
    _, plans = run_workload(workload, use_steady=True, steps=steps)
    planned = [tuple(row.seq_id for row in plan.rows) for plan in plans]
    # the prompts of 0 and 1; the arrival of 2 (its prefill); 2's last step finishes it, and 0's
    # twelfth token finishes 0: each time the running set changes, the next step is steady again
    assert planned == [(0, 1), (0, 1, 2)]
    assert len(steps) == 20 and steps.count((0, 1)) == 8


def test_a_stretch_that_resumes_finishes_its_rows_in_the_running_order() -> None:
    """Seq 1 parks and resumes first in the next step (a stretch of two steps), whose last
    step finishes both: in the running order (0, then 1), as schedule() and update() do."""
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=40)
    workload = Workload(num_blocks=40, block_size=4, config=config,
                        requests=(Request(0, 1, 4, False), Request(0, 4, 3, False)),
                        park_every=4, resume_min_parked=1, resume_max_wait_steps=1)  # fmt: skip
    steps: list[tuple[int, ...]] = []
    outputs, _ = run_workload(workload, use_stretches=True, steps=steps)
    assert (1, 0) in steps  # the resume step: its resume row first
    assert list(outputs) == list(run_workload(workload)[0]) == [0, 1]
