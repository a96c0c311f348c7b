"""Records passed between the scheduler and a runner (native engine or simulator replay).

The scheduler emits a `StepPlan`: which tokens of which sequences to feed, from which layer.
A runner executes it and answers with a `StepResult`: one `RowResult` per `RowPlan`, in order.
`StepDraft` is the scratch state schedule() builds a plan in.
"""

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class RowPlan:
    """One sequence's work in a step."""

    seq_id: int
    token_ids: tuple[int, ...]  # tokens fed this step, at positions start_position, ...
    start_position: int  # position of token_ids[0]
    is_prefill: bool  # a prompt or recompute chunk: runs every layer, never exits early
    is_sampling: bool  # produces a token this step: last prefill chunk, decode or resume row
    # 0 normally. > 0 for a parked rebatch row resuming its deep layers [start_layer, num_layers):
    # then token_ids is the single token at the parked position, already fed to the shallow layers.
    start_layer: int
    block_table: tuple[int, ...]  # the sequence's KV blocks, covering every position fed

    def __post_init__(self) -> None:
        assert self.token_ids, f"seq {self.seq_id}: a row must feed at least one token"
        assert self.start_position >= 0 and self.start_layer >= 0, f"seq {self.seq_id}: negative"
        if self.start_layer > 0:
            assert len(self.token_ids) == 1, f"seq {self.seq_id}: resume rows carry one token"
            assert not self.is_prefill and self.is_sampling, f"seq {self.seq_id}: bad resume row"
        if not self.is_prefill:
            assert len(self.token_ids) == 1 and self.is_sampling, f"seq {self.seq_id}: bad decode"

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def end_position(self) -> int:
        """One past the last position fed: the context length attended to by the last token."""
        return self.start_position + self.num_tokens

    @property
    def positions(self) -> range:
        return range(self.start_position, self.end_position)

    @property
    def is_resume(self) -> bool:
        """A parked row continuing from its exit point; it feeds no new position."""
        return self.start_layer > 0


@dataclass(frozen=True, kw_only=True)
class StepPlan:
    """One scheduler iteration: rows in scheduling order (resumes, decodes, prefill chunks)."""

    step_id: int  # increasing from 0; one per schedule() call
    rows: tuple[RowPlan, ...]
    num_preempted: int  # sequences preempted by recompute while building this plan

    @property
    def num_prefill_tokens(self) -> int:
        return sum(row.num_tokens for row in self.rows if row.is_prefill)

    @property
    def num_decode_rows(self) -> int:
        """Rows feeding one generated token, resume rows included."""
        return sum(1 for row in self.rows if not row.is_prefill)

    @property
    def num_resume_rows(self) -> int:
        return sum(1 for row in self.rows if row.is_resume)

    @property
    def num_context_tokens(self) -> int:
        """Sum over rows of the context length (end position) their last token attends to."""
        return sum(row.end_position for row in self.rows)

    @property
    def num_fed_tokens(self) -> int:
        """Tokens charged to the token budget (a resume row counts its one token)."""
        return sum(row.num_tokens for row in self.rows)

    @property
    def is_empty(self) -> bool:
        return not self.rows


@dataclass(frozen=True, kw_only=True)
class RowResult:
    """What a runner did with one `RowPlan`."""

    seq_id: int
    token_id: int | None  # the sampled token; None for a non-final prefill chunk or a parked row
    exit_layer: int | None  # layers run when the token was taken (num_layers = full depth)
    is_forced: bool  # the batching policy forced this row out before it was confident
    is_parked: bool  # a rebatch row stopped at parked_layer; its token comes from a later resume
    parked_layer: int | None  # the exit point it was parked at; None unless is_parked

    def __post_init__(self) -> None:
        assert self.is_parked == (self.parked_layer is not None), f"seq {self.seq_id}: parking"
        if self.is_parked:
            assert self.token_id is None, f"seq {self.seq_id}: a parked row has no token yet"
        assert (self.token_id is None) == (self.exit_layer is None), f"seq {self.seq_id}: exit"


@dataclass(frozen=True, kw_only=True)
class StepResult:
    """A runner's answer to one `StepPlan`, plus the counters cost models are fitted on."""

    step_id: int  # equals the plan's step_id
    rows: tuple[RowResult, ...]  # one per plan row, same order
    num_row_layers_executed: int  # (row, layer) pairs that ran the full layer
    num_kv_only_row_layers: int  # (row, layer) pairs that only computed K/V (KV-fill)
    num_rule_evals: int  # exit-rule evaluations (row × exit point)
    num_forced_exits: int  # rows forced out by the batching policy
    duration_s: float  # wall (engine) or modelled (simulator) time of the step
    num_exit_points: int = 0  # exit points where the batching policy was asked (batched calls)
    # Σ over layers of Σ (position + 1) over the tokens that ran that layer fully: the causal
    # (query, key) pairs attention scored. Prefill chunks grow it quadratically, which no
    # per-step token or context count captures.
    num_attention_pairs: int = 0
    cpu_s: float | None = (
        None  # the process's CPU seconds over the step (engine); None: not measured
    )

    @property
    def num_sampling_layers(self) -> int:
        """Distinct layers at which this step's tokens were taken. A runner samples the rows
        that take a token at one exit point in one batched call (LM head and sampler), so a
        policy whose rows exit at five different layers pays five calls where `full` pays one."""
        return len({row.exit_layer for row in self.rows if row.token_id is not None})

    def __post_init__(self) -> None:
        counters = (
            self.num_row_layers_executed,
            self.num_kv_only_row_layers,
            self.num_rule_evals,
            self.num_forced_exits,
            self.num_attention_pairs,
        )
        assert min(counters) >= 0 and self.duration_s >= 0, f"step {self.step_id}: negative"


class StepDraft:
    """Scratch state of one schedule() call (a plain slotted class: built once per step)."""

    __slots__ = ("num_preempted", "rows", "scheduled_ids", "token_budget")

    def __init__(self, token_budget: int) -> None:
        self.token_budget = token_budget  # tokens still free in this step
        self.rows: list[RowPlan] = []
        self.scheduled_ids: set[int] = set()
        self.num_preempted = 0

    def add(self, row: RowPlan) -> None:
        assert row.num_tokens <= self.token_budget, "row exceeds the token budget"
        self.rows.append(row)
        self.scheduled_ids.add(row.seq_id)
        self.token_budget -= row.num_tokens
