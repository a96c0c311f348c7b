"""``--suite fidelity``: the fitted cost model learnt on one workload, predicting live runs of
two others from their oracle traces."""

from __future__ import annotations

import tempfile
from pathlib import Path

from testbed.bench.options import BenchOptions, Say
from testbed.capture_records import CaptureConfig, EngineConfig
from testbed.core.policy_set import PolicyConfig
from testbed.engine.capture import build_requests, run_capture
from testbed.model.checkpoint import Checkpoint
from testbed.runinfo import write_run_info
from testbed.sim.cost_model import build_cost_model
from testbed.sim.metrics import compute_metrics
from testbed.sim.simulator import SimulationConfig, simulate
from testbed.trace import read_capture
from testbed.validate.measured import live_records

FIDELITY_CALIBRATION = "poisson:rate=6,n=40,prompt=64-256,output=64"
FIDELITY_TARGETS = (
    "poisson:rate=3,n=40,prompt=128-384,output=48",
    "poisson:rate=12,n=48,prompt=64-192,output=64",
)


def _measured(capture_dir: Path):
    return compute_metrics(live_records(read_capture(capture_dir)), [])


def run(opts: BenchOptions, ckpt: Checkpoint, say: Say = print) -> list[dict]:
    """Fit `fitted` on an oracle and a live run of one workload; predict live runs of other
    workloads from their oracle traces; print the error of throughput and mean TPOT."""
    policy = PolicyConfig(batching="consensus", threshold=0.95, min_exit_layer=4)
    live = CaptureConfig(mode="live", engine=EngineConfig(policy=policy))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        calib, _ = build_requests(
            FIDELITY_CALIBRATION, "cnndm", ckpt, seed=1, data_dir=opts.data_dir
        )
        run_capture(ckpt, calib, CaptureConfig(mode="oracle"), root / "calibration_oracle")
        run_capture(ckpt, calib, live, root / "calibration_live")
        fitted = f"fitted:{root / 'calibration_oracle'}+{root / 'calibration_live'}"
        fit = build_cost_model(fitted)
        say(fit.report.table())
        for i, workload in enumerate(FIDELITY_TARGETS):
            reqs, _ = build_requests(workload, "cnndm", ckpt, seed=2, data_dir=opts.data_dir)
            run_capture(ckpt, reqs, CaptureConfig(mode="oracle"), root / f"oracle{i}")
            run_capture(ckpt, reqs, live, root / f"live{i}")
            measured = _measured(root / f"live{i}")
            sim = simulate(SimulationConfig(
                trace=str(root / f"oracle{i}"), workload=workload, policy=policy,
                cost_model=fitted, seed=2, data_dir=opts.data_dir,
            ))  # fmt: skip
            p = sim.metrics
            for name, pred, real in (
                ("throughput tok/s", p.throughput_tokens_per_s, measured.throughput_tokens_per_s),
                ("mean TPOT ms", p.tpot_mean_s * 1e3, measured.tpot_mean_s * 1e3),
                ("mean TTFT ms", p.ttft_mean_s * 1e3, measured.ttft_mean_s * 1e3),
            ):
                rows.append({"workload": workload, "metric": name, "predicted": pred,
                             "measured": real, "error": pred / real - 1})  # fmt: skip
    say(f"{'workload':48s} {'metric':18s} {'predicted':>10s} {'measured':>10s} {'error':>7s}")
    for r in rows:
        say(f"{r['workload']:48s} {r['metric']:18s} {r['predicted']:10.2f} {r['measured']:10.2f} "
              f"{r['error']:+7.1%}")  # fmt: skip
    write_run_info(opts.out, {"policy": policy.label(), "calibration": FIDELITY_CALIBRATION},
                   seed=1, suite="fidelity", rows=rows)  # fmt: skip
    return rows
