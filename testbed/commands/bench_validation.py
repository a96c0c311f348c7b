"""``eetb bench --suite validation``: the demo's loop (calibrate → oracle capture → sweep →
validate top 3 + full) on three workloads; prints simulated-vs-measured errors and Kendall tau."""

from __future__ import annotations

import json
from pathlib import Path

from testbed.commands.common import ProgressLine
from testbed.demo import DemoConfig, run_demo
from testbed.runinfo import write_run_info

AZURE = "azure_llm_trace_2023/AzureLLMInferenceTrace_conv.csv"
# (name, workload, calibration workload): the demo's own (overloaded); a Poisson load near what
# this 2-core machine serves (~550 tokens/s at full depth); the Azure conversation trace's first
# requests time-scaled to 3 requests/s
WORKLOADS = (
    ("demo", DemoConfig.workload, DemoConfig.calibration_workload),
    ("poisson-saturated", "poisson:rate=12,n=96,prompt=64-320,output=48",
     "poisson:rate=12,n=48,prompt=64-320,output=48"),
    ("azure-scaled", f"azure:path={AZURE},n=48,rate=3", f"azure:path={AZURE},n=32,rate=3"),
)  # fmt: skip


def run(out: Path, data_dir: str | None, names: list[str] | None = None) -> int:
    rows = []
    chosen = [w for w in WORKLOADS if names is None or w[0] in names]
    write_run_info(out, {"workloads": chosen}, seed=0, suite="validation")
    for name, workload, calibration in chosen:
        # the demo's own run is exactly `eetb demo`'s; the others validate their one workload
        higher = DemoConfig.higher_load if name == "demo" else ""
        cfg = DemoConfig(workload=workload, higher_load=higher, calibration_workload=calibration)
        run_demo(cfg, out / name, data_dir=data_dir, progress=ProgressLine(min_interval_s=0))
        summary = json.loads((out / name / "validate" / "validation.json").read_text())
        errors = {(r["policy"], r["metric"]): r["error"] for r in summary["errors"]}
        for c in summary["configurations"]:
            rows.append((name, c["label"], errors.get((c["label"], "throughput_tokens_per_s")),
                         errors.get((c["label"], "tpot_mean_s")), c["speedup_predicted"],
                         c["speedup_measured"], summary["kendall_tau_throughput"]))  # fmt: skip
    print(f"{'workload':18s} {'configuration':40s} {'tput err':>8s} {'TPOT err':>8s} "
          f"{'speedup sim':>11s} {'speedup real':>12s} {'tau':>6s}")  # fmt: skip
    for name, label, e_tput, e_tpot, s_sim, s_real, tau in rows:
        print(f"{name:18s} {label:40s} {_pct(e_tput):>8s} {_pct(e_tpot):>8s} {_num(s_sim):>11s} "
              f"{_num(s_real):>12s} {_num(tau):>6s}")  # fmt: skip
    goal = [abs(e) for r in rows for e in r[2:4] if e is not None]
    if goal:
        print(f"largest |error| of throughput and mean TPOT over {len(rows)} validated runs: "
              f"{max(goal):.1%}; within 10%: {sum(e <= 0.10 for e in goal)}/{len(goal)}")  # fmt: skip
    return 0


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1%}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
