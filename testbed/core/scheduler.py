"""Iteration-level continuous batching with a token budget and preemption by recompute.

Modelled on nano-vllm and vLLM v1. Each `schedule()` builds one step, in this order:

  (a) resume rows: parked rebatch rows, all together, when the resume policy says so;
  (b) running sequences, FCFS: decode rows first (one token each), then continuing prefill chunks;
      a row short of KV blocks preempts the newest running sequence not yet in the step, or itself;
  (c) waiting sequences, FCFS, while max_num_seqs, the token budget and free blocks allow
      (skipped in a step that preempted, so a freed block is not handed straight to a newcomer).

A preempted sequence keeps its outputs and re-enters the waiting queue at the front. Its recompute
prefill feeds *all* its tokens (prompt + outputs) and its final chunk samples the next token,
exactly like an original prompt prefill; no special "last token as decode" case exists.

The token budget counts fed tokens: a prefill chunk its length, a decode or resume row one.
"""

import logging

from testbed.core.admission import SchedulerConfig, validate_request
from testbed.core.block_manager import BlockManager
from testbed.core.errors import InvalidRequestError, SchedulerConfigError, SchedulerStateError
from testbed.core.queues import SequenceQueues
from testbed.core.resume_gate import ResumePolicy, resume_delay
from testbed.core.sequence import Sequence, SequenceStatus
from testbed.core.step import RowPlan, RowResult, StepDraft, StepPlan, StepResult

__all__ = ["ResumePolicy", "Scheduler", "SchedulerConfig"]

logger = logging.getLogger(__name__)


class Scheduler:
    """Shared by the engine and the simulator: same add/update calls ⇒ same plans."""

    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        *,
        resume_policy: ResumePolicy | None = None,
        invariant_check_interval: int = 1,
    ) -> None:
        if invariant_check_interval < 1:
            raise SchedulerConfigError("invariant_check_interval must be >= 1")
        self._config = config
        # full invariant checks are O(blocks); long simulations check every n-th step instead
        self._check_interval = invariant_check_interval
        self._blocks = block_manager
        self._resume_policy = resume_policy  # None: parked rows resume at the next step
        self._queues = SequenceQueues()
        self._next_step_id = 0
        self._in_flight: StepPlan | None = None  # the non-empty plan awaiting update()
        self._last_seq_id: int | None = None  # seq_ids must increase with add() calls
        # the rows of the last steady step while nothing but steady steps that finished and
        # parked nothing happened since: then only the free blocks can end the stretch
        self._steady_rows: tuple[Sequence, ...] | None = None

    @property
    def config(self) -> SchedulerConfig:
        return self._config

    @property
    def block_manager(self) -> BlockManager:
        return self._blocks

    @property
    def num_waiting(self) -> int:
        return self._queues.num_waiting

    @property
    def num_running(self) -> int:
        return self._queues.num_running

    @property
    def num_parked(self) -> int:
        return self._queues.num_parked

    @property
    def num_finished(self) -> int:
        return self._queues.num_finished

    def has_unfinished(self) -> bool:
        return self._queues.has_unfinished()

    def get(self, seq_id: int) -> Sequence:
        """Any sequence ever added, finished ones included; KeyError if unknown."""
        return self._queues.get(seq_id)

    # ---- admission -------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a fresh request (FCFS); raises without touching the queue if it is invalid."""
        if self._last_seq_id is not None and seq.seq_id <= self._last_seq_id:
            raise InvalidRequestError(
                f"seq {seq.seq_id}: seq_id must exceed the previous one ({self._last_seq_id})"
            )
        validate_request(seq, self._config, self._blocks)
        self._last_seq_id = seq.seq_id
        self._steady_rows = None  # it may be the waiting head now
        self._queues.add_waiting(seq)

    # ---- one iteration ---------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        """Build the next step. An empty plan means nothing can run (or nothing is left)."""
        if self._in_flight is not None:
            raise SchedulerStateError(f"step {self._in_flight.step_id} was never update()d")
        step_id = self._next_step_id
        self._next_step_id += 1
        self._steady_rows = None
        draft = StepDraft(token_budget=self._config.max_num_batched_tokens)
        if self._queues.num_parked and self._should_resume(step_id):
            self._schedule_resumes(draft)
        # One snapshot for both passes: the decode pass only removes (preempts) sequences, and
        # _schedule_running skips those by status.
        running = self._queues.running
        self._schedule_running(draft, running, is_decode_pass=True)
        self._schedule_running(draft, running, is_decode_pass=False)
        if draft.num_preempted == 0 or not draft.rows:
            self._schedule_waiting(draft)
        # The gate trades waiting for a fuller deep batch, but an idle step gains nothing and,
        # with every block held by parked rows, would deadlock: resume them anyway.
        if not draft.rows and self._queues.num_parked:
            self._schedule_resumes(draft)
        plan = StepPlan(step_id=step_id, rows=tuple(draft.rows), num_preempted=draft.num_preempted)
        self._in_flight = None if plan.is_empty else plan
        self._check_invariants()
        return plan

    def _should_resume(self, step_id: int) -> bool:
        return resume_delay(self._resume_policy, self._queues.parked, step_id, 1) == 0

    def _schedule_resumes(self, draft: StepDraft) -> None:
        """All parked rows continue from their exit point with the token they were fed."""
        for seq in self._queues.parked:
            assert seq.parked_layer is not None and seq.num_computed_tokens == seq.num_tokens
            row = RowPlan(
                seq_id=seq.seq_id,
                token_ids=(seq.last_token_id,),
                start_position=seq.num_tokens - 1,
                is_prefill=False,
                is_sampling=True,
                start_layer=seq.parked_layer,
                block_table=tuple(seq.block_table),
            )
            self._resume(seq)
            draft.add(row)

    def _schedule_running(
        self, draft: StepDraft, running: tuple[Sequence, ...], *, is_decode_pass: bool
    ) -> None:
        # A snapshot: preemption removes sequences from the running list while we walk it.
        for seq in running:
            if seq.is_prefill_done != is_decode_pass or seq.seq_id in draft.scheduled_ids:
                continue
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this walk
                continue
            num_new = self._num_new_tokens(seq, draft.token_budget)
            if num_new == 0:
                continue
            if self._reserve_blocks(seq, seq.num_computed_tokens + num_new, draft):
                draft.add(self._make_row(seq, num_new))

    def _reserve_blocks(self, seq: Sequence, num_tokens: int, draft: StepDraft) -> bool:
        """Allocate seq's blocks for [0, num_tokens), preempting newer sequences while short.
        Returns False when seq itself had to be preempted."""
        while not self._blocks.can_allocate(seq, num_tokens):
            victim = self._pick_victim(seq, draft)
            self._preempt(victim, draft)
            if victim is seq:
                return False
        self._blocks.allocate(seq, num_tokens)
        return True

    def _pick_victim(self, seq: Sequence, draft: StepDraft) -> Sequence:
        """The newest running sequence that is newer than seq and not in this step; else seq.
        Parked rows are never victims: the runner holds their exit-point hidden state."""
        for candidate in reversed(self._queues.running):
            if candidate.seq_id <= seq.seq_id:
                break
            if candidate.seq_id not in draft.scheduled_ids:
                return candidate
        return seq

    def _preempt(self, seq: Sequence, draft: StepDraft) -> None:
        self._blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.is_prefill_done = False
        seq.num_preemptions += 1
        self._queues.preempt(seq)
        draft.num_preempted += 1
        logger.debug("preempted seq %d (%d tokens to recompute)", seq.seq_id, seq.num_tokens)

    def _schedule_waiting(self, draft: StepDraft) -> None:
        """Admit FCFS; stop at the first sequence that does not fit (no overtaking)."""
        while (seq := self._queues.next_waiting) is not None:
            if self._queues.num_in_flight >= self._config.max_num_seqs:
                return
            num_new = self._num_new_tokens(seq, draft.token_budget)
            if num_new == 0 or not self._blocks.can_allocate(seq, num_new):
                return
            self._blocks.allocate(seq, num_new)
            self._queues.admit_next()
            draft.add(self._make_row(seq, num_new))

    def _num_new_tokens(self, seq: Sequence, token_budget: int) -> int:
        """Tokens seq would feed this step; 0 when it has to wait for a later step."""
        num_remaining = seq.num_tokens - seq.num_computed_tokens
        assert num_remaining >= 1, f"seq {seq.seq_id} has nothing to feed"
        if self._config.enable_chunked_prefill:
            return min(num_remaining, token_budget)
        return num_remaining if num_remaining <= token_budget else 0

    def _make_row(self, seq: Sequence, num_new: int) -> RowPlan:
        start = seq.num_computed_tokens
        end = start + num_new
        return RowPlan(
            seq_id=seq.seq_id,
            token_ids=seq.token_ids_between(start, end),
            start_position=start,
            is_prefill=not seq.is_prefill_done,
            is_sampling=end == seq.num_tokens,
            start_layer=0,
            block_table=tuple(seq.block_table),
        )

    # ---- steady decode steps: a simulator's shortcut through schedule() and update() ---------

    def steady_step(self) -> tuple[Sequence, ...] | None:
        """The rows, in row order, when the next schedule() would plan exactly one decode row
        for each running sequence and, when they are due, a resume row for each parked one
        (first, as schedule() orders them), and nothing else: no prefill chunk, no preemption,
        no admission; parked rows that are not due wait on. None when it would plan anything
        else. Changes nothing. A resume row is a parked sequence (its parked_layer is set).
        A simulator spends most of its steps in such stretches; `apply_steady_steps` applies
        them without building their plans (tests/test_core_property.py and
        tests/test_sim_fastpath.py check both give the same runs)."""
        if self._in_flight is not None:
            return None
        if self._queues.num_parked:
            parked, running = self._queues.parked, self._queues.running
            if self._should_resume(self._next_step_id):
                return parked + running if self._only_decodes(running, len(parked)) else None
            if not running:  # an idle step resumes them anyway, after admission (schedule())
                return parked if self._only_decodes((), 0) else None
        running = self._steady_rows
        if running is not None:  # the same rows, and free blocks only fell: the head still waits
            if self._blocks.num_free_blocks < self._blocks.num_missing_for_decode(running):
                return None
            return running
        running = self._queues.running
        if not running or not self._only_decodes(running, 0):
            return None
        self._steady_rows = running
        return running

    def _only_decodes(self, running: tuple[Sequence, ...], num_resumes: int) -> bool:
        """Whether schedule() would plan num_resumes resume rows, one decode row of each of
        ``running``, and nothing else."""
        budget = self._config.max_num_batched_tokens - len(running) - num_resumes
        if budget < 0 or not all([seq.is_prefill_done for seq in running]):
            return False
        num_free = self._blocks.num_free_blocks - self._blocks.num_missing_for_decode(running)
        if num_free < 0:
            return False  # some row would preempt: schedule() decides who
        head = self._queues.next_waiting
        if head is not None and self._queues.num_in_flight < self._config.max_num_seqs:
            num_new = self._num_new_tokens(head, budget)
            if num_new and self._blocks.num_missing_blocks(head, num_new) <= num_free:
                return False  # schedule() would admit it
        return True

    def steady_horizon(self, seqs: tuple[Sequence, ...]) -> int:
        """How many steady steps of ``seqs`` in a row, the one steady_step just offered first,
        the scheduler would plan if no request were added and no row parked: until the step
        in which a row reaches max_tokens, the last the free blocks cover, or the step before
        parked rows that wait resume (resume rows resume in the first; the steps after run in
        the running order). At least 1. Changes nothing."""
        num_steps = min([seq.max_tokens - len(seq.output_token_ids) for seq in seqs])
        num_resumes = _num_resumes(seqs)
        if num_resumes == len(seqs) and not self._only_decodes((), num_resumes):
            return 1  # an idle step's resumes: the next step's smaller budget admits a chunk
        if self._queues.num_parked > num_resumes:  # some wait on
            parked, step_id = self._queues.parked, self._next_step_id + 1
            num_steps = 1 + resume_delay(self._resume_policy, parked, step_id, num_steps - 1)
        # the step after the last covered would preempt (steady_step checked the first fits)
        return self._blocks.decode_steps_covered(seqs, num_steps, num_resumes)

    def apply_steady_steps(
        self, seqs: tuple[Sequence, ...], num_steps: int, token_ids: list[list[int]],
        parked_layers: list[int | None] | None = None,
    ) -> tuple[list[Sequence], list[int]]:  # fmt: skip
        """Apply the next num_steps steady steps of ``seqs`` (at most steady_horizon(seqs)) as
        schedule() and update() would with these results: per row, its tokens in order. Only
        the last step may park rows (rebatch): a row with a parked layer parked there, and its
        list lacks that step's token. Returns the sequences the last step finished (only it
        can: a stretch ends with a row's first EOS) and the blocks each step took. Resume
        rows come first and resume in the first step."""
        if self._in_flight is not None:
            raise SchedulerStateError(f"step {self._in_flight.step_id} was never update()d")
        first_step_id = self._next_step_id
        self._next_step_id += num_steps
        num_resumes = _num_resumes(seqs)
        # as schedule() precedes update()
        new_blocks = self._blocks.allocate_for_decode_steps(seqs, num_steps, num_resumes)
        finished = []
        for r, (seq, tokens) in enumerate(zip(seqs, token_ids, strict=True)):
            is_resume = r < num_resumes  # its first step's position was counted when it parked
            seq.num_computed_tokens += num_steps - is_resume
            if is_resume:
                self._resume(seq)
                self._steady_rows = None  # the running rows changed
            seq.extend_tokens(tokens)
            if parked_layers is not None and parked_layers[r] is not None:
                self._park(seq, parked_layers[r], self._next_step_id - 1)
                self._steady_rows = None  # the running rows changed
            elif seq.status is SequenceStatus.FINISHED:
                self._blocks.free(seq)
                self._queues.finish(seq)
                finished.append(seq)
                self._steady_rows = None  # the running rows changed and blocks came free
        interval = self._check_interval
        if self._next_step_id // interval > first_step_id // interval:  # a step checks them
            self._check_invariants(force=True)
        if num_resumes and num_steps > 1:  # the last step's rows ran in the running order
            finished.sort(key=lambda seq: seq.seq_id)
        return finished, new_blocks

    # ---- applying a step's result ------------------------------------------------------------

    def update(self, plan: StepPlan, result: StepResult) -> list[Sequence]:
        """Apply a runner's result to the plan last scheduled; returns the sequences it finished."""
        if plan.is_empty:
            assert not result.rows, "an empty plan cannot have results"
            return []
        if plan is not self._in_flight:
            raise SchedulerStateError(f"step {plan.step_id} is not the plan awaiting update()")
        assert result.step_id == plan.step_id, f"result of step {result.step_id} for {plan.step_id}"
        assert [r.seq_id for r in result.rows] == [r.seq_id for r in plan.rows], "rows differ"
        self._in_flight = None
        finished = [
            seq
            for row, row_result in zip(plan.rows, result.rows, strict=True)
            if (seq := self._apply_row(row, row_result, plan.step_id)).is_finished
        ]
        self._check_invariants()
        return finished

    def _apply_row(self, row: RowPlan, row_result: RowResult, step_id: int) -> Sequence:
        seq = self._queues.get(row.seq_id)
        assert seq.status is SequenceStatus.RUNNING, f"seq {seq.seq_id} is {seq.status.name}"
        if not row.is_resume:  # a resume row's position was counted when it was parked
            assert seq.num_computed_tokens == row.start_position, f"seq {seq.seq_id}: gap"
            seq.num_computed_tokens += row.num_tokens
        if row.is_prefill and row.is_sampling:
            seq.is_prefill_done = True
        if row_result.is_parked:
            assert not row.is_prefill, f"seq {seq.seq_id}: prefill rows run every layer"
            assert (row_result.parked_layer or 0) > row.start_layer, (
                f"seq {seq.seq_id}: parked at {row_result.parked_layer}, started at {row.start_layer}"
            )
            self._park(seq, row_result.parked_layer, step_id)
        elif row.is_sampling:
            assert row_result.token_id is not None, f"seq {seq.seq_id}: sampling row lacks a token"
            seq.append_token(row_result.token_id)
            if seq.is_finished:
                self._blocks.free(seq)
                self._queues.finish(seq)
        else:
            assert row_result.token_id is None, f"seq {seq.seq_id}: token from a mid-prefill chunk"
        return seq

    def _park(self, seq: Sequence, parked_layer: int | None, step_id: int) -> None:
        assert parked_layer is not None, f"seq {seq.seq_id}: parked at no layer"
        seq.parked_layer = parked_layer
        seq.parked_since_step = step_id
        self._queues.park(seq)

    def _resume(self, seq: Sequence) -> None:
        seq.parked_layer = None
        seq.parked_since_step = None
        self._queues.resume(seq)

    def _check_invariants(self, *, force: bool = False) -> None:
        if self._next_step_id % self._check_interval and not force:
            return
        self._queues.check_invariants()
        self._blocks.check_invariants(self._queues.block_owners())
        for seq in self._queues.waiting:
            assert seq.num_computed_tokens == 0 and not seq.block_table, f"seq {seq.seq_id} waits"
        for seq in self._queues.parked:
            assert seq.num_computed_tokens == seq.num_tokens, f"seq {seq.seq_id} parked early"
            assert seq.parked_layer is not None and seq.parked_since_step is not None


def _num_resumes(seqs: tuple[Sequence, ...]) -> int:
    """The resume rows of a steady step (steady_step puts them first): the parked sequences."""
    return sum([seq.parked_layer is not None for seq in seqs])
