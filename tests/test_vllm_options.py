"""The vLLM backend's settings: hf_overrides parsed and checked, refused policies say why.

Needs no vLLM: the CLI refuses a policy before vLLM would start.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from testbed.core.policy_set import PolicyConfig
from testbed.errors import ConfigError
from testbed.vllm_backend.options import (
    ARCHITECTURE,
    OVERRIDES_KEY,
    VllmEarlyExitConfig,
    check_supported,
    parse_overrides,
    to_overrides,
)


def test_overrides_round_trip():
    cfg = VllmEarlyExitConfig(
        PolicyConfig(batching="quorum", batching_params=(("fraction", 0.75),), threshold=0.95,
                     min_exit_layer=3),
        record="live",
    )  # fmt: skip
    raw = to_overrides(cfg)
    assert raw["architectures"] == [ARCHITECTURE]
    assert parse_overrides(raw[OVERRIDES_KEY]) == cfg


def test_absent_settings_mean_full_depth():
    assert parse_overrides(None) == VllmEarlyExitConfig()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"batching": "shrink"}, "rows cannot leave a vLLM batch"),
        ({"batching": "rebatch"}, "scheduler"),
        ({"batching": "skipdecode", "batching_params": {"max_tokens": 8, "min_layer": 2}},
         "output index"),
        ({"batching": "consensus", "kv_fill": "lazy"}, "KV fill 'lazy'"),
        ({"batching": "consensus", "kv_fill": "skip"}, "mask"),
        ({"batching": "consensus", "decay_tau": 1.0}, "decaying threshold"),
        ({"batching": "consensus", "record": "oracle"}, "oracle recording runs full depth"),
        ({"record": "sometimes"}, "record mode"),
        ({"batchign": "full"}, "unknown hf_overrides"),
        ({"batching_params": [1]}, "must be a mapping"),
    ],
)  # fmt: skip
def test_refused_settings_say_why(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_overrides(raw)


def test_supported_policies_pass():
    for batching, params in (("full", ()), ("consensus", ()), ("quorum", (("fraction", 0.5),))):
        check_supported(
            PolicyConfig(batching=batching, batching_params=params, exit_rule="softmax")
        )


def test_cli_refuses_a_policy_vllm_cannot_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "testbed.cli", "capture", "--engine", "vllm", "--batching",
         "shrink", "--workload", "poisson:rate=4,n=2,prompt=8-16,output=4", "--dataset",
         "synthetic", "--out", str(tmp_path / "t")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("eetb: error: vLLM cannot run batching 'shrink'")
    assert "Traceback" not in proc.stderr
