"""Engine properties on random workloads: blocks, preemption, determinism; and bad input."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies import PolicyConfigError, UnknownPolicyError
from testbed.capture_records import EngineConfig
from testbed.core import RequestNeverFitsError, RequestTooLongError, SchedulerConfig
from testbed.core.policy_set import PolicyConfig
from testbed.engine.engine import LLMEngine
from testbed.engine.sampler import SamplingParams
from testbed.errors import ConfigError
from tests.engine_helpers import TINY, tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=1)


def _engine(ckpt, *, kv_mb, block_size=4, max_num_seqs=4, policy=PolicyConfig(), seed=0):
    sched = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=64, max_model_len=96)
    cfg = EngineConfig(
        policy=policy, scheduler=sched, block_size=block_size, kv_cache_mb=kv_mb, seed=seed
    )
    return LLMEngine(ckpt, cfg)


def _kv_mb_for_blocks(num_blocks: int, block_size: int) -> float:
    per_block = 2 * TINY.num_hidden_layers * block_size * TINY.num_key_value_heads * 8 * 4
    return num_blocks * per_block / 2**20 + 1e-9


workloads = st.lists(
    st.tuples(
        st.lists(st.integers(3, TINY.vocab_size - 1), min_size=1, max_size=24),
        st.integers(1, 10),
    ),
    min_size=1,
    max_size=6,
)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    workload=workloads, num_blocks=st.integers(9, 30), policy=st.sampled_from(["full", "shrink"])
)
def test_tiny_kv_budget_emits_same_tokens(ckpt, workload, num_blocks, policy):
    """Preemption by recompute under a tiny KV budget changes nothing a user sees (greedy, full);
    blocks are all freed and never owned twice (the scheduler asserts that every step)."""
    pc = PolicyConfig(batching=policy, threshold=1.0)  # unreachable λ: exits never change tokens
    big = _engine(ckpt, kv_mb=4.0, policy=pc)
    small = _engine(ckpt, kv_mb=_kv_mb_for_blocks(num_blocks, 4), policy=pc)
    preemptions = []
    outs = {}
    for name, eng in (("big", big), ("small", small)):
        ids = [
            eng.add_request(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p, n in workload
        ]
        done = {}
        while eng.has_unfinished():
            for out in eng.step():
                done[out.seq_id] = out
                preemptions.append(out.num_preemptions)
        assert sorted(done) == ids, "every request finishes"
        assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
        outs[name] = [done[i].token_ids for i in ids]
    assert outs["small"] == outs["big"]


def test_tiny_budget_really_preempts(ckpt):
    eng = _engine(ckpt, kv_mb=_kv_mb_for_blocks(10, 4))
    outs = eng.generate(
        [[5] * 20, [6] * 20, [7] * 20], SamplingParams(max_tokens=12, ignore_eos=True)
    )
    assert sum(o.num_preemptions for o in outs) > 0


def test_same_seed_same_samples_other_seed_differs(ckpt):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, ignore_eos=True)
    prompts = [[3, 4, 5], [9, 8, 7, 6]]
    a = [o.token_ids for o in _engine(ckpt, kv_mb=4.0, seed=7).generate(prompts, params)]
    b = [o.token_ids for o in _engine(ckpt, kv_mb=4.0, seed=7).generate(prompts, params)]
    c = [o.token_ids for o in _engine(ckpt, kv_mb=4.0, seed=8).generate(prompts, params)]
    assert a == b
    assert a != c


def test_bad_requests_rejected_and_batch_survives(ckpt):
    eng = _engine(ckpt, kv_mb=_kv_mb_for_blocks(12, 4))
    ok = eng.add_request([3, 4, 5], SamplingParams(max_tokens=4, ignore_eos=True))
    with pytest.raises(RequestTooLongError):
        eng.add_request([3] * 95, SamplingParams(max_tokens=4))
    with pytest.raises(RequestNeverFitsError):  # 12 blocks of 4 = 48 tokens: never fits
        eng.add_request([3] * 60, SamplingParams(max_tokens=10))
    with pytest.raises(ConfigError):
        SamplingParams(max_tokens=0)
    done = []
    while eng.has_unfinished():
        done += eng.step()
    assert [o.seq_id for o in done] == [ok] and len(done[0].token_ids) == 4


@pytest.mark.parametrize(
    "fields,error",
    [
        (dict(batching="nope"), UnknownPolicyError),
        (dict(exit_rule="softmax", threshold=1.5), PolicyConfigError),
        (dict(kv_fill="nope"), UnknownPolicyError),
        (dict(batching="quorum", batching_params=(("fraction", 0.0),)), PolicyConfigError),
    ],
)
def test_bad_policy_config_is_refused_where_it_is_made(fields, error):
    with pytest.raises(error):
        PolicyConfig(**fields)


def test_arrival_paced_run_reports_latencies(ckpt):
    eng = _engine(ckpt, kv_mb=4.0)
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    requests = [(0.0, [3, 4, 5], params), (0.05, [6, 7], params), (0.02, [8, 9, 10, 11], params)]
    outs = eng.run(requests)
    assert [o.prompt_token_ids for o in outs] == [tuple(r[1]) for r in requests]
    for (arrival, _, _), out in zip(requests, outs, strict=True):
        assert out.arrival_s == arrival
        assert len(out.token_ids) == 5
        assert out.first_token_s >= arrival, "no token before its request arrived"
        assert 0 <= out.ttft_s <= out.latency_s
        assert out.tpot_s > 0
