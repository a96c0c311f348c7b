"""The SimPy simulator: arrivals feed the shared scheduler; an engine loop yields one event per
step, whose length a cost model gives for the work the replay runner counted (DESIGN §7).

There is no scheduling logic here: ``testbed.core.Scheduler`` and ``BlockManager`` decide, the
policies decide, exactly as in the engine; only the runner (``ReplayRunner``) differs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import accumulate, islice, repeat
from operator import attrgetter

import numpy as np
import simpy

from testbed.capture_records import DTYPE_BYTES, num_kv_blocks
from testbed.core import BlockManager, Scheduler, SchedulerConfig
from testbed.core import Sequence as SeqState
from testbed.core.errors import CoreError
from testbed.core.policy_set import PolicyConfig, build_policies
from testbed.core.step import StepPlan
from testbed.cost_spec import CostModelSpec
from testbed.sim.cost_model import CostModel, StepFeatures, build_cost_model, context_tokens_of
from testbed.sim.errors import SimulationError
from testbed.sim.hardware import ModelShape
from testbed.sim.metrics import Metrics, RequestRecord, StepRecord, compute_metrics
from testbed.sim.replay import ReplayRunner, StepWork
from testbed.sim.steady_stretch import SteadyStretch
from testbed.sim.step_work import SteadyWork
from testbed.sim.token_source import TokenStream, TraceTokens, check_exit_points
from testbed.trace import Capture, read_capture
from testbed.workload.lengths import workload_lengths
from testbed.workload.spec import LengthSpec
from testbed.workload.transforms import ClipReport

# The scheduler's full invariant check is O(KV blocks): with 4096 blocks it costs a few simulated
# steps, 5% of the run when done every 64th step. A simulation checks every 1024th step (the engine
# and the property tests check every step).
INVARIANT_CHECK_INTERVAL = 1024
DEFAULT_NUM_KV_BLOCKS = 4096
_ROW_LAYERS = attrgetter("num_row_layers_executed")
_KV_ONLY_ROW_LAYERS = attrgetter("num_kv_only_row_layers")


@dataclass(frozen=True)
class SimulationConfig:
    trace: str  # capture directory to replay (oracle: any rule and λ; live: its own rule)
    workload: str  # e.g. "poisson:rate=4,n=200,prompt=64-512,output=64"
    policy: PolicyConfig = PolicyConfig()
    cost_model: str = "roofline:H100"
    scheduler: SchedulerConfig = SchedulerConfig()
    block_size: int = 16
    # None: the engine's own count for the trace's model when the cost model prices that engine
    # (a fit), else DEFAULT_NUM_KV_BLOCKS (a 7B model on a GPU holds about that many)
    num_kv_blocks: int | None = None
    seed: int = 0
    data_dir: str | None = None
    # longest prompt + output; it replaces scheduler.max_model_len. None: the context of the model
    # the cost model prices (a 7B roofline: 4096), else the engine's context for the trace's model
    # (a fit prices that model). The trace only supplies exit behaviour, not the lengths.
    max_model_len: int | None = None
    allow_partial: bool = False  # replay an interrupted capture's finished requests


@dataclass(frozen=True)
class SimulationResult:
    config: SimulationConfig  # as run: max_model_len, scheduler's and num_kv_blocks resolved
    metrics: Metrics
    clip: ClipReport  # requests whose lengths did not fit max_model_len (clipped, say so)
    requests: tuple[RequestRecord, ...] = ()
    steps: tuple[StepRecord, ...] = ()
    num_rejected: int = 0  # requests the scheduler refused (too long, never fit)
    plans: tuple[StepPlan, ...] = field(default=(), repr=False)  # kept when asked (parity tests)


@dataclass
class _Tracked:
    request_id: int
    arrival_s: float
    num_prompt_tokens: int
    agrees: list[list[bool]]  # [trace index][layer - 1]: exit token equals the final (see _agrees)
    first_token_s: float | None = None
    exit_layers: list[int] = field(default_factory=list)  # per output position
    num_forced: int = 0


class Simulation:
    """One run; ``run()`` returns its result. Build with :func:`simulate` for the usual path."""

    def __init__(self, capture: Capture, lengths: list[LengthSpec], cfg: SimulationConfig,
                 cost: CostModel, *, keep_plans: bool = False,
                 clip: ClipReport | None = None) -> None:  # fmt: skip
        self.cfg, self.cost, self.lengths = cfg, cost, lengths
        self.clip = clip if clip is not None else ClipReport(len(lengths), 0, 0, 0)
        self.policies = build_policies(cfg.policy, num_layers=capture.num_layers)
        self.tokens = TraceTokens(capture)
        if self.policies.batching.needs_signals:
            self.tokens.check_signal(self.policies.exit_rule.signal)
            check_exit_points(capture, self.policies.exit_points)
        self.num_layers = capture.num_layers
        self.eos = capture.meta["model"].get("config", {}).get("eos_token_id")
        if cfg.num_kv_blocks is None:
            raise SimulationError("Simulation needs num_kv_blocks; simulate() resolves it")
        self.blocks = BlockManager(cfg.num_kv_blocks, cfg.block_size)
        self.scheduler = Scheduler(
            cfg.scheduler, self.blocks, resume_policy=self.policies.batching,
            invariant_check_interval=INVARIANT_CHECK_INTERVAL,
        )  # fmt: skip
        self.runner = ReplayRunner(self.policies, self.num_layers)
        self._rule = cfg.policy.exit_rule if self.policies.batching.is_early_exit else "none"
        self.env = simpy.Environment()
        self.rng = np.random.default_rng(cfg.seed)
        self.keep_plans = keep_plans
        self.plans: list[StepPlan] = []
        self.tracked: dict[int, _Tracked] = {}
        self.records: list[RequestRecord] = []
        self.steps: list[StepRecord] = []
        self.num_rejected = 0
        self._agree_cache: dict[int, list[list[bool]]] = {}
        self._work = self.env.event()
        self._next_seq_id = 0
        self._arrivals_done = False
        self.on_step: Callable[[StepPlan, StepWork], None] | None = None
        self._next_arrival_s = float("inf")  # when the arrivals process wakes next

    @property
    def _use_steady(self) -> bool:
        # steady steps build no plans: a run that keeps or hooks them takes every step's
        return self.runner.has_steady and not self.keep_plans and self.on_step is None

    def run(self) -> SimulationResult:
        self.env.process(self._arrivals())
        done = self.env.process(self._engine())
        self.env.run(until=done)
        return SimulationResult(
            self.cfg, compute_metrics(self.records, self.steps), self.clip, tuple(self.records),
            tuple(self.steps), self.num_rejected, tuple(self.plans),
        )  # fmt: skip

    def _arrivals(self):
        for request_id, spec in enumerate(self.lengths):
            if spec.arrival_s > self.env.now:  # simultaneous arrivals join before the next step
                delay_s = spec.arrival_s - self.env.now
                self._next_arrival_s = self.env.now + delay_s  # the time SimPy schedules it at
                yield self.env.timeout(delay_s)
            self._admit(request_id, spec)
        self._arrivals_done = True
        self._next_arrival_s = float("inf")
        self._wake()

    def _admit(self, request_id: int, spec: LengthSpec) -> None:
        stream = self.tokens.for_request(request_id, spec.num_output_tokens, self.rng)
        own = self.tokens.streams.get(request_id) is stream
        seq = SeqState(
            seq_id=self._next_seq_id, prompt_token_ids=(0,) * spec.num_prompt_tokens,
            max_tokens=spec.num_output_tokens, arrival_s=self.env.now,
            # a borrowed stream must not stop early, nor one of a workload with eos=ignore
            eos_token_id=self.eos if own and not spec.ignore_eos else None,
        )  # fmt: skip
        try:
            self.scheduler.add(seq)
        except CoreError:
            self.num_rejected += 1
            return
        self._next_seq_id += 1
        self.runner.add_sequence(seq.seq_id, stream, spec.num_prompt_tokens, spec.num_output_tokens)
        self.tracked[seq.seq_id] = _Tracked(
            request_id, self.env.now, spec.num_prompt_tokens,
            self._agrees(stream, spec.num_output_tokens),
        )  # fmt: skip
        self._wake()

    def _agrees(self, stream: TokenStream, max_tokens: int) -> list[list[bool]]:
        """Per trace index and layer, whether the exit token equals the final one, as plain
        lists, shared by every request that borrows the stream, and at least max_tokens long
        (padded with the last index's, which every later output position reads). A layer an
        oracle did not record (NaN) counts as agreeing."""
        key = id(stream)  # the streams live as long as self.tokens
        if key not in self._agree_cache:
            m = stream.matches_final
            self._agree_cache[key] = np.where(np.isnan(m), True, m == 1).tolist()
        agrees = self._agree_cache[key]
        if agrees and len(agrees) < max_tokens:
            agrees.extend([agrees[-1]] * (max_tokens - len(agrees)))
        return agrees

    def _wake(self) -> None:
        if not self._work.triggered:
            self._work.succeed()

    def _engine(self):
        while True:
            if not self.scheduler.has_unfinished():
                if self._arrivals_done:
                    return
                self._work = self.env.event()
                yield self._work
                continue
            plan = self.scheduler.schedule()
            work = self.runner.execute(plan)
            duration_s = self.cost.step_time_s(self._features(plan, work))
            start_s = self.env.now
            yield self.env.timeout(duration_s)
            self._finish_step(plan, work, start_s, duration_s)
            if self._use_steady:
                yield from self._steady_steps()

    def _steady_steps(self):
        """Run steady decode steps (Scheduler.steady_step) back to back until one would start
        at or after the next arrival, then let SimPy's clock catch up in one timeout. The same
        steps as the loop above, at the same times: only their plans and SimPy events are not
        built, and the scheduler applies each stretch of them at its end (steady_stretch.py),
        which is most of a step's cost in a long simulation."""
        start_s = now_s = self.env.now
        durations: list[float] = []
        sched, price = self.scheduler, self.cost.step_time_s
        next_arrival_s = self._next_arrival_s  # only a SimPy event, after the yield, moves it
        while now_s < next_arrival_s:  # a request that arrived by now joins the next step
            seqs = sched.steady_step()
            if seqs is None:
                break
            stretch = self.runner.stretch(seqs, sched.steady_horizon(seqs), self._rule)
            stretch_start_s, first = now_s, len(durations)
            works: list[SteadyWork] = []
            for ahead in range(stretch.num_steps):
                if now_s >= next_arrival_s:
                    break
                work = stretch.step(ahead)
                if work is None:
                    break
                duration_s = price(work.features)
                works.append(work)
                durations.append(duration_s)
                now_s += duration_s  # the addition SimPy makes for a timeout
                if work.parked_layers is not None:  # the rows change: the stretch ends here
                    break
            if not works:
                break
            self._finish_stretch(seqs, stretch, works, durations[first:], stretch_start_s)
        if not durations:
            return
        if start_s + (now_s - start_s) == now_s:  # exact unless the clock was near 0
            yield self.env.timeout(now_s - start_s)
        else:
            for duration_s in durations:
                yield self.env.timeout(duration_s)

    def _finish_stretch(
        self, seqs: tuple[SeqState, ...], stretch: SteadyStretch, works: list[SteadyWork],
        durations: list[float], start_s: float,
    ) -> None:  # fmt: skip
        """_finish_step for a stretch's steps (only its last can park or finish rows): apply
        them to the scheduler; record the steps, each row's tokens, and the requests finished."""
        num_used = self.blocks.num_blocks - self.blocks.num_free_blocks
        parked = works[-1].parked_layers
        finished, new_blocks = self.scheduler.apply_steady_steps(
            seqs, len(works), stretch.tokens(len(works), parked), parked
        )
        # positional (start_s, duration_s, row-layers, K/V-only row-layers, blocks used,
        # preempted), by map: a million of these make an hour. The start times are the same
        # additions as the loop's clock.
        assert len(new_blocks) == len(works) == len(durations), "one count per step"
        starts_s = list(accumulate(durations, initial=start_s))
        features = [w.features for w in works]
        used = islice(accumulate(new_blocks, initial=num_used), 1, None)  # after each step
        self.steps.extend(map(StepRecord, starts_s, durations, map(_ROW_LAYERS, features),
                              map(_KV_ONLY_ROW_LAYERS, features), used, repeat(0)))  # fmt: skip
        start_s = starts_s[-1]
        if finished:  # the last step's record counts the blocks its finished rows freed
            num_used = self.blocks.num_blocks - self.blocks.num_free_blocks
            self.steps[-1] = self.steps[-1]._replace(num_blocks_used=num_used)
        layers = zip(*[w.exit_layers for w in works], strict=True)  # per row, per step
        forced = zip(*[w.is_forced for w in works], strict=True)
        for seq, row_layers, row_forced in zip(seqs, layers, forced, strict=True):
            if row_layers[-1] is None:  # parked: its token comes when it resumes
                row_layers, row_forced = row_layers[:-1], row_forced[:-1]
            t = self.tracked[seq.seq_id]
            t.exit_layers.extend(row_layers)
            t.num_forced += sum(row_forced)
        for seq in finished:
            self._record(seq, start_s)

    def _features(self, plan: StepPlan, work: StepWork) -> StepFeatures:
        num_prefill_tokens = num_decode_rows = num_context_tokens = 0
        for row in plan.rows:  # one pass instead of StepPlan's three properties
            num_tokens = len(row.token_ids)
            num_context_tokens += row.start_position + num_tokens
            if row.is_prefill:
                num_prefill_tokens += num_tokens
            else:
                num_decode_rows += 1
        r = work.result
        return StepFeatures(
            num_rows=len(plan.rows), num_prefill_tokens=num_prefill_tokens,
            num_decode_rows=num_decode_rows, num_context_tokens=num_context_tokens,
            num_row_layers_executed=r.num_row_layers_executed,
            num_kv_only_row_layers=r.num_kv_only_row_layers, num_rule_evals=r.num_rule_evals,
            rule=self._rule, layer_tokens=work.layer_tokens,
            layer_context_tokens=work.layer_context_tokens,
            layer_kv_only_tokens=work.layer_kv_only_tokens,
            num_layers_run=len(work.layer_tokens) - work.layer_tokens.count(0),
            num_exit_points=r.num_exit_points, num_attention_pairs=r.num_attention_pairs,
            num_sampling_layers=r.num_sampling_layers,
        )  # fmt: skip

    def _finish_step(
        self, plan: StepPlan, work: StepWork, start_s: float, duration_s: float
    ) -> None:
        finished = self.scheduler.update(plan, work.result)
        now = self.env.now
        for row in work.result.rows:
            if row.token_id is None:
                continue
            t = self.tracked[row.seq_id]
            if t.first_token_s is None:
                t.first_token_s = now
            t.exit_layers.append(row.exit_layer)
            t.num_forced += row.is_forced
        self.steps.append(StepRecord(
            start_s=start_s, duration_s=duration_s,
            num_row_layers_executed=work.result.num_row_layers_executed,
            num_kv_only_row_layers=work.result.num_kv_only_row_layers,
            num_blocks_used=self.blocks.num_blocks - self.blocks.num_free_blocks,
            num_preempted=plan.num_preempted,
        ))  # fmt: skip
        if self.keep_plans:
            self.plans.append(plan)
        if self.on_step is not None:
            self.on_step(plan, work)
        for seq in finished:
            self._record(seq, now)

    def _record(self, seq: SeqState, now: float) -> None:
        t = self.tracked.pop(seq.seq_id)
        self.runner.release(seq.seq_id)
        # per output position, whether its exit token equals the final (agrees is padded)
        flags = tuple([t.agrees[i][layer - 1] for i, layer in enumerate(t.exit_layers)])
        self.records.append(RequestRecord(
            request_id=t.request_id, arrival_s=t.arrival_s, first_token_s=t.first_token_s,
            finish_s=now, num_prompt_tokens=t.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens, exit_layers=tuple(t.exit_layers),
            num_forced_exits=t.num_forced, num_preemptions=seq.num_preemptions,
            agreement_flags=flags,
        ))  # fmt: skip


def simulate(cfg: SimulationConfig, *, keep_plans: bool = False) -> SimulationResult:
    """One simulation run; a top-level function so executors can ship it to workers."""
    capture = read_capture(cfg.trace, allow_partial=cfg.allow_partial)
    if (cfg.num_kv_blocks is not None and cfg.num_kv_blocks <= 0) or cfg.block_size <= 0:
        raise SimulationError("num_kv_blocks and block_size must be positive")
    cost = build_cost_model(cfg.cost_model, trace_meta=capture.meta)
    max_len = cfg.max_model_len or context_tokens_of(cost) or engine_context(capture)
    blocks = cfg.num_kv_blocks
    if blocks is None and CostModelSpec.parse(str(cfg.cost_model)).prices_this_engine:
        blocks = engine_kv_blocks(capture, cfg.block_size)  # a fit: simulate the engine it priced
    blocks = blocks or DEFAULT_NUM_KV_BLOCKS
    cfg = replace(cfg, max_model_len=max_len, num_kv_blocks=blocks,
                  scheduler=replace(cfg.scheduler, max_model_len=max_len))  # fmt: skip
    lengths, clip = workload_lengths(
        cfg.workload, seed=cfg.seed, max_model_len=max_len, data_dir=cfg.data_dir
    )
    return Simulation(capture, lengths, cfg, cost, keep_plans=keep_plans, clip=clip).run()


def engine_context(capture: Capture) -> int:
    """The context the engine ran the trace's model at: its max_position_embeddings, capped
    like the engine caps it."""
    config = capture.meta["model"].get("config", {})
    model_len = int(config.get("max_position_embeddings") or SchedulerConfig.max_model_len)
    return min(SchedulerConfig.max_model_len, model_len)


def engine_kv_blocks(capture: Capture, block_size: int) -> int | None:
    """The blocks of ``block_size`` tokens that hold as many tokens as the K/V memory of the
    engine that wrote the trace: its recorded block count (vLLM's blocks are its own size), or
    for a trace of the native engine that predates it, what its kv_cache_mb held. None for a
    trace that says neither."""
    meta = capture.meta
    if meta.get("num_kv_blocks") and meta.get("block_size"):
        return meta["num_kv_blocks"] * meta["block_size"] // block_size
    if not meta.get("kv_cache_mb") or meta.get("dtype") not in DTYPE_BYTES:
        return None
    shape = ModelShape.from_capture_meta(meta)
    return num_kv_blocks(meta["kv_cache_mb"], block_size=block_size, dtype=meta["dtype"],
                         num_layers=shape.num_layers, num_kv_heads=shape.num_kv_heads,
                         head_dim=shape.head_dim)  # fmt: skip
