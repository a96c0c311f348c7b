"""A whole simulated timeline against event times computed by hand."""

from __future__ import annotations

import pytest

from policies import PolicyConfigError
from testbed.core import SchedulerConfig
from testbed.core.policy_set import PolicyConfig
from testbed.sim.cost_model import FittedCostModel
from testbed.sim.errors import SimulationError
from testbed.sim.simulator import Simulation, SimulationConfig, simulate
from testbed.trace import CaptureWriter, read_capture
from testbed.workload.spec import LengthSpec

L = 6


EOS = 2


def _trace(path, *, with_signals=True, eos_position=None):
    """A hand-made oracle trace: request r emits tokens 10+r, 20+r, ... (EOS at eos_position);
    hidden cosine rises with depth so that λ=0.5 exits at layer 3."""
    meta = {
        "mode": "oracle", "model": {"num_layers": L, "name": "hand", "checkpoint_hash": "-",
                                    "config": {"eos_token_id": EOS}},
        "engine": {"name": "native", "version": "test"}, "policy": {"batching": "full"}, "seed": 0,
    }  # fmt: skip
    with CaptureWriter(path, meta) as w:
        for r in range(2):
            for pos in range(3):
                w.append("tokens", {
                    "request_id": r, "position": pos,
                    "token_id": EOS if pos == eos_position else 10 * (pos + 1) + r,
                    "exit_layer": L, "is_forced": False, "executed_layers": L, "filled_layers": 0,
                    "softmax_margin": [0.1] * L,
                    "hidden_cosine": [0.1, 0.2, 0.6, 0.7, 0.8, 0.9] if with_signals else None,
                    "classifier_prob": None, "matches_final": [False, False, True, True, True, True],
                })  # fmt: skip
            w.append("requests", {"request_id": r, "arrival_s": 0.0, "num_prompt_tokens": 4,
                                  "num_output_tokens": 3, "max_tokens": 3, "first_token_s": 0.1,
                                  "finish_s": 0.2, "num_preemptions": 0})  # fmt: skip
    return read_capture(path)


COST = FittedCostModel(("overhead", "row_layers"), (1.0, 0.1))  # seconds: 1 + 0.1 per row-layer


def _run(tmp_path, policy, lengths, *, eos_position=None):
    cap = _trace(tmp_path / "t", eos_position=eos_position)
    cfg = SimulationConfig(trace=str(tmp_path / "t"), workload="", policy=policy,
                           scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64,
                                                     max_model_len=64), block_size=4, num_kv_blocks=16)  # fmt: skip
    return Simulation(cap, lengths, cfg, COST).run()


def test_full_depth_timeline_by_hand(tmp_path):
    # A: arrives 0, prompt 4, 2 tokens. B: arrives 1.5, prompt 2, 1 token.
    res = _run(tmp_path, PolicyConfig(), [LengthSpec(0.0, 4, 2), LengthSpec(1.5, 2, 1)])
    # step 0 at t=0: A's prefill, 4 tokens x 6 layers = 24 row-layers -> 1 + 2.4 = 3.4 s
    # step 1 at t=3.4: A decodes 1 token + B's 2-token prefill: 18 row-layers -> 2.8 s, ends 6.2
    a, b = sorted(res.requests, key=lambda r: r.request_id)
    assert a.first_token_s == pytest.approx(3.4) and a.finish_s == pytest.approx(6.2)
    assert b.arrival_s == 1.5 and b.first_token_s == pytest.approx(6.2)
    assert b.finish_s == pytest.approx(6.2)
    assert [s.start_s for s in res.steps] == pytest.approx([0.0, 3.4])
    assert res.metrics.ttft_mean_s == pytest.approx((3.4 + 4.7) / 2)
    assert res.metrics.duration_s == pytest.approx(6.2)


def test_a_stream_stops_at_its_eos_unless_the_workload_ignores_it(tmp_path):
    # the oracle stream has EOS at position 1: a summary ends there; a trace replay runs on to
    # the length its trace gives (workload eos=ignore), as the engine does with ignore_eos
    stop = _run(tmp_path / "a", PolicyConfig(), [LengthSpec(0.0, 4, 3)], eos_position=1)
    assert [r.num_output_tokens for r in stop.requests] == [2]
    exact = LengthSpec(0.0, 4, 3, ignore_eos=True)
    run_on = _run(tmp_path / "b", PolicyConfig(), [exact], eos_position=1)
    assert [r.num_output_tokens for r in run_on.requests] == [3]
    assert len(run_on.steps) == len(stop.steps) + 1


def test_early_exit_timeline_by_hand(tmp_path):
    policy = PolicyConfig(batching="shrink", exit_rule="hidden", threshold=0.5, kv_fill="copy")
    res = _run(tmp_path, policy, [LengthSpec(0.0, 4, 3)])
    # step 0: prefill 24 row-layers -> 3.4 s. Steps 1, 2: one decode row exits at layer 3
    # (cosine 0.6 >= 0.5): 3 row-layers -> 1.3 s each; copy fills 3 K/V-only layers (free here).
    (a,) = res.requests
    assert [s.duration_s for s in res.steps] == pytest.approx([3.4, 1.3, 1.3])
    assert a.exit_layers == (L, 3, 3)
    assert a.finish_s == pytest.approx(6.0)
    assert res.metrics.num_filled_row_layers == 6
    assert res.metrics.est_agreement == 1.0


def test_bad_simulation_input(tmp_path):
    _trace(tmp_path / "t", with_signals=False)
    cfg = SimulationConfig(trace=str(tmp_path / "t"), workload="poisson:rate=1,n=2,prompt=4,output=2",
                           policy=PolicyConfig(batching="shrink", exit_rule="hidden"),
                           cost_model="roofline:H100:llama-2-7b")  # fmt: skip
    with pytest.raises(SimulationError, match="no 'hidden_cosine' signal"):
        simulate(cfg)
    with pytest.raises(PolicyConfigError):  # refused where the config is made
        PolicyConfig(batching="nope")


SMOLLM2 = "traces/samples/oracle_smollm2"  # written by the native engine: 256 MB of float32 K/V


@pytest.mark.parametrize(
    ("cost_model", "num_kv_blocks", "expected"),
    [
        # a fit prices the engine that wrote the trace: its 256 MB hold 364 of SmolLM2's blocks
        # (2 x 30 layers x 16 tokens x 3 heads x 64 x 4 bytes = 720 KiB each)
        (f"fitted:{SMOLLM2}", None, 364),
        ("roofline:H100", None, 4096),  # another model on another machine: the default
        (f"fitted:{SMOLLM2}", 1000, 1000),  # given: as given
    ],
)
def test_the_simulated_kv_capacity_is_the_priced_engine_s(cost_model, num_kv_blocks, expected):
    cfg = SimulationConfig(trace=SMOLLM2, workload="poisson:rate=1,n=2,prompt=8,output=2",
                           cost_model=cost_model, num_kv_blocks=num_kv_blocks)  # fmt: skip
    assert simulate(cfg).config.num_kv_blocks == expected


def test_a_trace_that_does_not_size_its_cache_simulates_the_default(tmp_path):
    _trace(tmp_path / "t")  # like vLLM's: no kv_cache_mb in its meta
    cfg = SimulationConfig(trace=str(tmp_path / "t"), workload="poisson:rate=1,n=2,prompt=4,output=2",
                           cost_model="fitted:" + SMOLLM2)  # fmt: skip
    assert simulate(cfg).config.num_kv_blocks == 4096
