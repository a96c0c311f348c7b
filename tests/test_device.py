"""The native engine on a chosen torch device and dtype. Here on the CPU: names, refusals and
dtypes; the ``gpu`` tests run the same engine on CUDA and compare it with the CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from testbed.capture_records import DTYPE_BYTES, CaptureConfig, CaptureRequest, EngineConfig
from testbed.commands.common import DTYPE_NAMES
from testbed.core import SchedulerConfig
from testbed.core.policy_set import PolicyConfig
from testbed.engine.capture import run_capture
from testbed.engine.device import DTYPES, place, resolve_device, resolve_dtype
from testbed.engine.engine import LLMEngine
from testbed.engine.sampler import SamplingParams
from testbed.errors import ConfigError
from testbed.sim.simulator import engine_kv_blocks
from testbed.trace import read_capture
from tests.engine_helpers import prompts, tiny_checkpoint

HAS_CUDA = torch.cuda.is_available()
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=3)


def _generate(ckpt, *, device, dtype="float32", **policy):
    cfg = EngineConfig(policy=PolicyConfig(**policy), scheduler=SchedulerConfig(max_num_seqs=4),
                       kv_cache_mb=4.0, block_size=4, device=device, dtype=dtype)  # fmt: skip
    engine = LLMEngine(ckpt, cfg)
    outs = engine.generate(prompts(6, seed=4), SamplingParams(max_tokens=12, ignore_eos=True))
    return engine, outs


def test_device_names_resolve_and_bad_ones_are_refused():
    assert resolve_device("auto").type == ("cuda" if HAS_CUDA else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    with pytest.raises(ConfigError, match="dtype 'int8'"):
        resolve_dtype("int8")
    assert set(DTYPE_NAMES) == set(DTYPES)  # the CLI's torch-free list matches the engine's
    for name, dtype in DTYPES.items():  # the simulator sizes the engine's K/V memory with these
        assert DTYPE_BYTES[name] == torch.empty((), dtype=dtype).element_size()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_simulator_reads_the_engine_s_kv_capacity_off_its_capture(ckpt, tmp_path, dtype):
    cfg = CaptureConfig(engine=EngineConfig(kv_cache_mb=0.5, block_size=4, device="cpu",
                                            dtype=dtype))  # fmt: skip
    requests = [CaptureRequest(0, 0.0, tuple(prompts(1, seed=1)[0]), 3)]
    run_capture(ckpt, requests, cfg, tmp_path / "c")
    engine = LLMEngine(ckpt, cfg.engine)
    # a float32 block costs twice a bfloat16 one: the count must follow the dtype
    assert engine_kv_blocks(read_capture(tmp_path / "c"), 4) == engine.block_manager.num_blocks
    assert engine_kv_blocks(read_capture(tmp_path / "c"), 8) == engine.block_manager.num_blocks // 2


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line_and_exit_2(ckpt):
    with pytest.raises(ConfigError, match="sees no CUDA device"):
        LLMEngine(ckpt, EngineConfig(device="cuda"))
    result = subprocess.run(
        [sys.executable, "-m", "testbed.cli", "generate", "--prompt", "hi", "--device", "cuda:0"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2 and "sees no CUDA device" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bfloat16_engine_runs_in_bfloat16_and_leaves_the_checkpoint_alone(ckpt):
    engine, outs = _generate(ckpt, device="cpu", dtype="bfloat16", batching="shrink",
                             exit_rule="hidden", threshold=0.9, kv_fill="lazy")  # fmt: skip
    assert engine.runner.cache.keys.dtype == torch.bfloat16
    assert next(engine.runner.model.parameters()).dtype == torch.bfloat16
    assert engine.runner.exit_heads.weight.dtype == torch.bfloat16
    assert next(ckpt.model.parameters()).dtype == torch.float32  # a moved copy, not the original
    assert all(len(o.token_ids) == 12 for o in outs)


def test_placing_on_the_modules_own_device_and_dtype_is_free(ckpt):
    assert place(ckpt.model, torch.device("cpu"), torch.float32) is ckpt.model


POLICIES = [
    dict(batching="full"),
    dict(batching="consensus", exit_rule="hidden", threshold=0.9, kv_fill="copy"),
    dict(batching="shrink", exit_rule="softmax", threshold=0.3, kv_fill="lazy"),
    dict(batching="rebatch", exit_rule="classifier", threshold=0.5, kv_fill="recompute"),
]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device here")
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p["batching"])
def test_cuda_generates_what_the_cpu_generates(ckpt, policy):
    _, on_cpu = _generate(ckpt, device="cpu", **policy)
    engine, on_gpu = _generate(ckpt, device="cuda", **policy)
    assert engine.runner.cache.keys.device.type == "cuda"
    same = sum(a == b for x, y in zip(on_cpu, on_gpu, strict=True)
               for a, b in zip(x.token_ids, y.token_ids, strict=True))  # fmt: skip
    total = sum(len(o.token_ids) for o in on_cpu)
    assert same / total >= 0.9  # float32 on both; kernels differ in the last bits only


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device here")
def test_an_oracle_capture_on_cuda_records_its_device_and_timed_steps(ckpt, tmp_path):
    reqs = [CaptureRequest(i, 0.0, tuple(p), 8) for i, p in enumerate(prompts(4, seed=5))]
    out = run_capture(ckpt, reqs, CaptureConfig(engine=EngineConfig(device="cuda")), tmp_path / "c")
    cap = read_capture(out)
    assert cap.meta["device"].startswith("cuda") and cap.tokens.num_rows == 4 * 8
    assert min(cap.steps["duration_s"].to_pylist()) > 0
