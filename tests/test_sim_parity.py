"""DESIGN §2: same workload, same trace, same policy ⇒ the engine and the simulator produce the
same sequence of step plans, and each row executes the same layers. For every policy."""

from __future__ import annotations

import pytest

from testbed.capture_records import CaptureConfig, CaptureRequest, EngineConfig
from testbed.core import SchedulerConfig
from testbed.core.policy_set import PolicyConfig
from testbed.engine.capture import run_capture
from testbed.engine.engine import LLMEngine
from testbed.sim.cost_model import build_cost_model
from testbed.sim.simulator import Simulation, SimulationConfig
from testbed.trace import read_capture
from testbed.workload.spec import LengthSpec
from tests.engine_helpers import prompts, tiny_checkpoint

POLICIES = {
    "full": PolicyConfig(),
    "consensus": PolicyConfig(batching="consensus", threshold=0.9),
    "quorum": PolicyConfig(batching="quorum", batching_params=(("fraction", 0.5),), threshold=0.9),
    "shrink": PolicyConfig(batching="shrink", threshold=0.9, min_exit_layer=2),
    "rebatch": PolicyConfig(
        batching="rebatch",
        batching_params=(("park_below_fraction", 0.6), ("min_deep_rows", 2), ("max_wait_steps", 2)),
        threshold=0.9,
    ),
    "skipdecode": PolicyConfig(
        batching="skipdecode", batching_params=(("max_tokens", 12), ("min_layer", 2))
    ),
    "shrink_lazy": PolicyConfig(batching="shrink", threshold=0.9, kv_fill="lazy"),
    "consensus_recompute": PolicyConfig(batching="consensus", threshold=0.9, kv_fill="recompute"),
    "shrink_skip": PolicyConfig(
        batching="shrink", exit_rule="softmax", threshold=0.3, kv_fill="skip"
    ),
}
SCHED = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=48, max_model_len=128)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=3)


def _plan_key(plan):
    return tuple((r.seq_id, r.start_position, r.num_tokens, r.start_layer) for r in plan.rows)


def _result_key(result):
    rows = tuple((r.token_id, r.exit_layer, r.is_forced, r.parked_layer) for r in result.rows)
    return (
        rows,
        result.num_row_layers_executed,
        result.num_kv_only_row_layers,
        result.num_rule_evals,
        result.num_attention_pairs,
        result.num_sampling_layers,
    )


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_engine_and_simulator_step_plans_agree(ckpt, tmp_path, name):
    policy = POLICIES[name]
    ps = prompts(7, seed=11, lo=3, hi=30)
    requests = [CaptureRequest(i, 0.0, tuple(p), 12) for i, p in enumerate(ps)]
    engine_steps = []
    cfg = CaptureConfig(
        mode="live",
        engine=EngineConfig(policy=policy, scheduler=SCHED, block_size=4, kv_cache_mb=0.05),
    )
    run_capture(ckpt, requests, cfg, tmp_path / "live",
                on_step=lambda plan, result: engine_steps.append((plan, result)))  # fmt: skip
    capture = read_capture(tmp_path / "live")
    num_blocks = _engine_blocks(ckpt, cfg)
    sim_cfg = SimulationConfig(
        trace=str(tmp_path / "live"), workload="", policy=policy, cost_model="roofline:H100",
        scheduler=SCHED, block_size=4, num_kv_blocks=num_blocks,
    )  # fmt: skip
    lengths = [LengthSpec(0.0, len(p), 12) for p in ps]
    sim_steps = []
    sim = Simulation(
        capture, lengths, sim_cfg, build_cost_model("roofline:H100", trace_meta=capture.meta)
    )
    sim.on_step = lambda plan, work: sim_steps.append((plan, work.result))
    sim.run()
    assert len(sim_steps) == len(engine_steps)
    for (ep, er), (sp, sr) in zip(engine_steps, sim_steps, strict=True):
        assert _plan_key(sp) == _plan_key(ep)
        assert _result_key(sr) == _result_key(er)
    if name != "full":
        assert any(r.exit_layer and r.exit_layer < 6 for _, er in engine_steps for r in er.rows)
    if name == "rebatch":
        assert any(r.is_parked for _, er in engine_steps for r in er.rows), "nothing was parked"


def _engine_blocks(ckpt, cfg) -> int:
    return LLMEngine(ckpt, cfg.engine).block_manager.num_blocks
