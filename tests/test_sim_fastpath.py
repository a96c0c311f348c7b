"""The simulator's fast paths equal its general paths (DESIGN §4), on random inputs:

* BatchingPolicy.step_exits against asking the batching policy at every exit point;
* confident_layers against ThresholdRule.confident, KvFillPolicy.fill_kind against its decide;
* whole simulations with the replay fast path on and off: same plans, results and records;
* the roofline's plain-Python step price against its matrix form.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies import (
    ConsensusBatching,
    CopyFill,
    ExitPoints,
    ExitSignals,
    FullBatching,
    HiddenCosineRule,
    LazyFill,
    QuorumBatching,
    RebatchBatching,
    RecomputeFill,
    ShrinkBatching,
    SkipDecodeBatching,
    SkipFill,
    create,
)
from policies.fast_path import confident_layers, has_confident_layers
from testbed.core import SchedulerConfig
from testbed.core.policy_set import PolicyConfig
from testbed.sim.cost_model import ModelShape, RooflineCostModel, StepFeatures
from testbed.sim.replay import ReplayRunner
from testbed.sim.roofline import gpu_spec
from testbed.sim.simulator import Simulation, SimulationConfig
from testbed.trace import CaptureWriter, read_capture
from testbed.workload.spec import LengthSpec

# ---- batching: whole-step outcome against one decide() per exit point -------------------------


def _general_exits(policy, confident: np.ndarray, positions: np.ndarray, points: ExitPoints,
                   starts: np.ndarray | None = None):  # fmt: skip
    """The replay runner's general loop for decode rows starting at ``starts`` (default layer
    0): confident is bool [rows, num_layers] (column ℓ-1: confident after ℓ layers)."""
    rows, L = confident.shape
    starts = np.zeros(rows, dtype=int) if starts is None else starts
    running, has_token = np.ones(rows, bool), np.zeros(rows, bool)
    executed, token_layer, forced = [L] * rows, [L] * rows, [False] * rows
    parked = [None] * rows
    num_points = num_evals = 0
    for layer in range(1, L):
        if not running.any():
            break
        if not policy.is_early_exit or not points.is_exit_point(layer, L):
            continue
        cand = np.flatnonzero(running & (starts < layer))
        if len(cand) == 0:
            continue
        conf = np.zeros(len(cand), bool)
        need = ~has_token[cand]
        if policy.needs_signals and need.any():
            num_evals += int(need.sum())
            conf[need] = confident[cand[need], layer - 1]
        num_points += 1
        d = policy.decide(layer=layer, num_layers=L, confident=conf,
                          has_token=has_token[cand], positions=positions[cand])  # fmt: skip
        for i, r in enumerate(cand):
            if d.take_token[i]:
                has_token[r], token_layer[r], forced[r] = True, layer, bool(d.is_forced[i])
            if not d.keep_running[i]:
                running[r], executed[r] = False, layer
            if d.park[i]:
                token_layer[r], parked[r] = None, layer
    return executed, token_layer, forced, num_points, num_evals, parked


POLICY = st.one_of(
    st.just(FullBatching()),
    st.just(ConsensusBatching()),
    st.just(ShrinkBatching()),
    st.builds(QuorumBatching, fraction=st.sampled_from([0.1, 0.3, 0.5, 0.75, 1.0])),
    st.builds(SkipDecodeBatching, max_tokens=st.integers(1, 40), min_layer=st.integers(1, 9)),
    st.builds(RebatchBatching, park_below_fraction=st.sampled_from([0.0, 0.3, 0.5, 0.8, 1.0])),
)


@settings(max_examples=400, deadline=None)
@given(
    policy=POLICY,
    num_layers=st.integers(2, 9),
    rows=st.integers(1, 7),
    min_exit_layer=st.integers(1, 9),
    stride=st.integers(1, 3),
    seed=st.integers(0, 2**31),
)
def test_step_exits_equal_one_decision_per_exit_point(
    policy, num_layers, rows, min_exit_layer, stride, seed
):
    rng = np.random.default_rng(seed)
    confident = rng.random((rows, num_layers)) < rng.random()
    positions = rng.integers(0, 50, rows)
    points = ExitPoints(min_exit_layer=min_exit_layer, stride=stride)
    exit_layers = points.layers(num_layers)
    first = [next((e for e in exit_layers if confident[r, e - 1]), num_layers) for r in range(rows)]
    fast = policy.step_exits(first, positions.tolist(), exit_layers, num_layers)
    assert fast is not None and policy.has_step_exits
    got = (fast.executed, fast.token_layer, fast.is_forced, fast.num_exit_points,
           fast.num_rule_evals, fast.parked_layer or [None] * rows)  # fmt: skip
    assert got == _general_exits(policy, confident, positions, points)


@settings(max_examples=300, deadline=None)
@given(
    fraction=st.sampled_from([0.0, 0.3, 0.5, 0.8, 1.0]),
    num_layers=st.integers(2, 9),
    rows=st.integers(1, 7),
    min_exit_layer=st.integers(1, 9),
    stride=st.integers(1, 3),
    seed=st.integers(0, 2**31),
)
def test_rebatch_resume_rows_equal_one_decision_per_exit_point(
    fraction, num_layers, rows, min_exit_layer, stride, seed
):
    """Rows resuming from a parked layer join the exit points above it; each was not confident
    up to its parked layer (that is why it parked)."""
    rng = np.random.default_rng(seed)
    points = ExitPoints(min_exit_layer=min_exit_layer, stride=stride)
    exit_layers = points.layers(num_layers)
    starts = np.where(rng.random(rows) < 0.5, rng.integers(1, num_layers, rows), 0)
    confident = rng.random((rows, num_layers)) < rng.random()
    confident[np.arange(num_layers)[None, :] < starts[:, None]] = False  # up to layer start
    positions = rng.integers(0, 50, rows)
    first = [next((e for e in exit_layers if confident[r, e - 1]), num_layers) for r in range(rows)]
    policy = RebatchBatching(park_below_fraction=fraction)
    fast = policy.step_exits_from(first, positions.tolist(), starts.tolist(), exit_layers,
                                  num_layers)  # fmt: skip
    got = (fast.executed, fast.token_layer, fast.is_forced, fast.num_exit_points,
           fast.num_rule_evals, fast.parked_layer)  # fmt: skip
    assert got == _general_exits(policy, confident, positions, points, starts)


def test_subclasses_take_the_general_path():
    """A third-party subclass may change the decision itself: only exact built-ins are fast."""

    class Hurried(ConsensusBatching):
        def _decide(self, **kw):
            return ShrinkBatching._decide(self, **kw)

    class Inverted(HiddenCosineRule):
        def confident(self, signals, *, positions, max_tokens):
            return ~super().confident(signals, positions=positions, max_tokens=max_tokens)

    class Overruled(ShrinkBatching):
        def decide(self, **kw):
            return ConsensusBatching.decide(self, **kw)

    assert ConsensusBatching().has_step_exits and not Hurried().has_step_exits
    assert not Overruled().has_step_exits
    assert has_confident_layers(HiddenCosineRule(0.5)) and not has_confident_layers(Inverted(0.5))

    class Stingy(CopyFill):
        def _from_skipped(self, skipped):
            return SkipFill()._from_skipped(skipped)

    assert CopyFill().fill_kind is not None and Stingy().fill_kind is None


# ---- exit rules and KV fill ----------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    rule=st.sampled_from(["softmax", "hidden", "classifier"]),
    threshold=st.floats(0.0, 1.0),
    decay_tau=st.one_of(st.none(), st.floats(0.0, 5.0)),
    num_layers=st.integers(2, 8),
    max_tokens=st.integers(1, 30),
    seed=st.integers(0, 2**31),
)
def test_confident_layers_equal_the_rule_at_every_exit_point(
    rule, threshold, decay_tau, num_layers, max_tokens, seed
):
    r = create("exit_rule", rule, threshold=threshold, decay_tau=decay_tau)
    rng = np.random.default_rng(seed)
    values = rng.random((max_tokens, num_layers))
    values[rng.random(values.shape) < 0.2] = np.nan
    values[rng.random(values.shape) < 0.1] = threshold  # ties at λ count as confident
    exit_layers = ExitPoints(min_exit_layer=1 + seed % 2).layers(num_layers)
    positions = np.arange(max_tokens)
    got = confident_layers(r, values, exit_layers=exit_layers, num_layers=num_layers,
                           positions=positions, max_tokens=max_tokens)  # fmt: skip
    masks = {
        layer: r.confident(ExitSignals(**{r.signal: values[:, layer - 1]}), positions=positions,
                           max_tokens=np.full(max_tokens, max_tokens))
        for layer in exit_layers
    }  # fmt: skip
    expected = [next((e for e in exit_layers if masks[e][p]), num_layers) for p in positions]
    assert got == expected


@pytest.mark.parametrize("policy", [CopyFill(), LazyFill(), RecomputeFill(), SkipFill()])
@settings(max_examples=50, deadline=None)
@given(executed=st.lists(st.integers(0, 8), min_size=1, max_size=6))
def test_fill_kind_equals_decide(policy, executed):
    kind = policy.fill_kind
    d = policy.decide(executed_layers=np.array(executed), num_layers=8)
    skipped = np.arange(8)[None, :] >= np.array(executed)[:, None]
    assert (d.fill_now == (skipped & kind.is_filled_now)).all()
    assert (d.owe == (skipped & kind.is_owed)).all()


# ---- whole simulations, fast path on and off -----------------------------------------------------

L = 6
POLICIES = [
    PolicyConfig(),
    PolicyConfig(batching="consensus", threshold=0.6, min_exit_layer=2),
    PolicyConfig(batching="quorum", batching_params=(("fraction", 0.5),), threshold=0.7),
    PolicyConfig(batching="shrink", threshold=0.6, kv_fill="lazy"),
    PolicyConfig(batching="consensus", threshold=0.5, kv_fill="recompute", decay_tau=3.0),
    PolicyConfig(batching="shrink", exit_rule="softmax", threshold=0.4, kv_fill="skip"),
    PolicyConfig(batching="skipdecode", batching_params=(("max_tokens", 8), ("min_layer", 2))),
    PolicyConfig(batching="rebatch", threshold=0.6, exit_stride=2),  # fast until a resume
    PolicyConfig(
        batching="rebatch", batching_params=(("park_below_fraction", 0.9),), threshold=0.5
    ),
]


def _signal(rng) -> list[float | None]:
    """One token's signal per layer, a tenth of them unrecorded."""
    return [None if rng.random() < 0.1 else float(x) for x in rng.random(L)]


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    """An oracle trace with random signals (some unrecorded) and EOS tokens here and there."""
    rng = np.random.default_rng(7)
    path = tmp_path_factory.mktemp("fast") / "oracle"
    meta = {"mode": "oracle", "model": {"num_layers": L, "name": "rand", "checkpoint_hash": "-",
                                        "config": {"eos_token_id": 2}},
            "engine": {"name": "native", "version": "test"}, "policy": {"batching": "full"},
            "seed": 0}  # fmt: skip
    with CaptureWriter(path, meta) as w:
        for r in range(5):
            n = int(rng.integers(3, 16))
            for pos in range(n):
                w.append("tokens", {
                    "request_id": r, "position": pos, "token_id": 2 if rng.random() < 0.05 else 9,
                    "exit_layer": L, "is_forced": False, "executed_layers": L, "filled_layers": 0,
                    "softmax_margin": _signal(rng), "hidden_cosine": _signal(rng),
                    "classifier_prob": _signal(rng), "matches_final": (rng.random(L) < 0.7).tolist(),
                })  # fmt: skip
            w.append("requests", {"request_id": r, "arrival_s": 0.0, "num_prompt_tokens": 4,
                                  "num_output_tokens": n, "max_tokens": n, "first_token_s": 0.1,
                                  "finish_s": 0.2, "num_preemptions": 0})  # fmt: skip
    return read_capture(path)


# (gap to the previous arrival, prompt, output); prompt + output <= 48: none is rejected
REQUESTS = st.lists(
    st.tuples(
        st.sampled_from([0.0, 0.0, 0.001, 0.004, 0.02]), st.integers(1, 30), st.integers(1, 18)
    ),
    min_size=1,
    max_size=10,
)


def _random_runs(test):
    """Hypothesis over a policy of POLICIES, a request stream and a K/V capacity."""
    strategies = given(policy=st.sampled_from(POLICIES), requests=REQUESTS,
                       num_kv_blocks=st.integers(12, 40))  # fmt: skip
    return settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])(strategies(test))  # fmt: skip


def _lengths(requests) -> list[LengthSpec]:
    lengths, arrival_s = [], 0.0
    for gap_s, num_prompt, num_output in requests:
        arrival_s += gap_s
        lengths.append(LengthSpec(arrival_s, num_prompt, num_output))
    return lengths


def _simulation(capture, policy, lengths, num_kv_blocks, *, use_fast_path, keep_plans=False):
    cfg = SimulationConfig(
        trace=str(capture.path), workload="", policy=policy, cost_model="roofline:H100",
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=24, max_model_len=48),
        block_size=4, num_kv_blocks=num_kv_blocks,
    )  # fmt: skip
    cost = RooflineCostModel(gpu_spec("H100"), ModelShape.preset("llama-2-7b"))
    sim = Simulation(capture, lengths, cfg, cost, keep_plans=keep_plans)
    sim.runner = ReplayRunner(sim.policies, sim.num_layers, use_fast_path=use_fast_path)
    return sim


def _run(capture, policy, lengths, num_kv_blocks, *, use_fast_path):
    """A run that keeps its plans and hooks its steps: every step is planned."""
    sim = _simulation(capture, policy, lengths, num_kv_blocks, use_fast_path=use_fast_path,
                      keep_plans=True)  # fmt: skip
    works = []
    sim.on_step = lambda plan, work: works.append(work)
    return sim.run(), works


@_random_runs
def test_replay_fast_path_equals_general_path(capture, policy, requests, num_kv_blocks):
    lengths = _lengths(requests)
    fast, fast_works = _run(capture, policy, lengths, num_kv_blocks, use_fast_path=True)
    slow, slow_works = _run(capture, policy, lengths, num_kv_blocks, use_fast_path=False)
    assert fast.plans == slow.plans
    assert fast_works == slow_works
    assert fast.requests == slow.requests and fast.steps == slow.steps
    assert fast.num_rejected == slow.num_rejected


def _run_unhooked(capture, policy, lengths, num_kv_blocks, *, use_fast_path):
    """A run as simulate() makes it: no plans kept, no step hook, so steady steps are taken
    wherever the fast path is on and the fill owes nothing."""
    sim = _simulation(capture, policy, lengths, num_kv_blocks, use_fast_path=use_fast_path)
    return sim, sim.run()


@_random_runs
def test_steady_steps_equal_planned_steps(capture, policy, requests, num_kv_blocks):
    """Steady decode steps (no plan, one SimPy timeout for a stretch of them) give the same
    requests, step records and metrics, to the bit, as planning and timing every step."""
    lengths = _lengths(requests)
    sim, steady = _run_unhooked(capture, policy, lengths, num_kv_blocks, use_fast_path=True)
    _, planned = _run_unhooked(capture, policy, lengths, num_kv_blocks, use_fast_path=False)
    assert sim.runner.has_steady == (policy.kv_fill in ("copy", "skip"))
    assert steady.requests == planned.requests and steady.steps == planned.steps
    assert steady.metrics == planned.metrics and steady.num_rejected == planned.num_rejected


def test_a_simulation_takes_steady_steps_and_plans_the_rest(capture):
    """Two long requests decoding together: after their prefills, every step is steady."""
    policy = PolicyConfig(batching="consensus", threshold=0.6, min_exit_layer=2)
    lengths = [LengthSpec(0.0, 8, 18), LengthSpec(0.0, 6, 18)]
    cfg = SimulationConfig(trace=str(capture.path), workload="", policy=policy,
                           cost_model="roofline:H100", num_kv_blocks=40)  # fmt: skip
    cost = RooflineCostModel(gpu_spec("H100"), ModelShape.preset("llama-2-7b"))
    sim = Simulation(capture, lengths, cfg, cost)
    plans, schedule = [], sim.scheduler.schedule
    sim.scheduler.schedule = lambda: plans.append(schedule()) or plans[-1]
    result = sim.run()
    assert result.metrics.num_steps == 18 and len(plans) == 1  # one prefill step, 17 steady


# ---- roofline: plain Python against the matrix form ----------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    num_source=st.integers(1, 12),
    num_target=st.sampled_from([1, 5, 8, 24, 32, 40]),
    rule=st.sampled_from(["none", "hidden", "softmax"]),
    efficiency=st.floats(0.2, 1.0),
    seed=st.integers(0, 2**31),
)
def test_roofline_plain_python_equals_matrix_form(num_source, num_target, rule, efficiency, seed):
    rng = np.random.default_rng(seed)
    shape = ModelShape(num_target, 4096, 11008, 32, 8, 128, 32000, 2)
    model = RooflineCostModel(gpu_spec("a100"), shape, overhead_s=1e-4, efficiency=efficiency)
    tokens = np.sort(rng.integers(0, 40, num_source))[::-1]  # rows exit: counts fall with depth
    if rng.random() < 0.5:
        tokens[:] = tokens[0]  # ... or every layer runs the same rows
    context = tokens * rng.integers(1, 900)
    kv_only = tokens[0] - tokens
    f = StepFeatures(
        num_rows=int(rng.integers(1, 40)), num_prefill_tokens=0, num_decode_rows=1,
        num_context_tokens=int(rng.integers(0, int(context.max()) + 2)),
        num_row_layers_executed=int(tokens.sum()), num_kv_only_row_layers=int(kv_only.sum()),
        num_rule_evals=int(rng.integers(0, 40)), rule=rule, layer_tokens=tuple(tokens.tolist()),
        layer_context_tokens=tuple(context.tolist()), layer_kv_only_tokens=tuple(kv_only.tolist()),
    )  # fmt: skip
    assert model.step_time_s(f) == pytest.approx(model.reference_step_time_s(f), rel=1e-12)
