"""validation.json: every configuration's comparison summarised, with the error tables, the
Kendall taus, the noise floor and what is missing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from testbed.compare import (
    GOAL_METRICS,
    error_rows,
    kendall_tau,
    noise_rows,
    relative_error,
    resolved_pairs,
)
from testbed.runinfo import to_jsonable
from testbed.validate.config import VALIDATION_SCHEMA_VERSION, ValidationConfig
from testbed.validate.runs import write_doc
from testbed.validate.speed import Calibration

Doc = dict[str, Any]
THROUGHPUT = "throughput_tokens_per_s"


def _compared(done: Sequence[Doc], key: str) -> tuple[list[Doc], float | None, float | None]:
    """Error rows, Kendall tau of throughput and the largest goal error of predictions ``key``
    (all at the reference speed, each run at its probed speed, or in hindsight at the speed
    its steps ran)."""
    rows = [row for d in done for row in error_rows(d["label"], d[key], d["measured"])]
    tau = kendall_tau([d[key][THROUGHPUT] for d in done], [d["measured"][THROUGHPUT] for d in done])
    goal = [abs(r["error"]) for r in rows if r["metric"] in GOAL_METRICS and r["error"] is not None]
    return rows, tau, max(goal) if goal else None


def _ordering(done: Sequence[Doc]) -> tuple[list[tuple[int, int]], float | None, list[list[str]]]:
    """The pairs whose order the rounds agree on (4 of 5), Kendall tau over them alone (None
    when no pair is resolved: what tau misses beyond them is noise), and the pairs the rounds
    cannot order (no ranking claim is made there)."""
    pairs = resolved_pairs([[r[THROUGHPUT] for r in d["measured_runs"]] for d in done])
    tau = kendall_tau([d["predicted"][THROUGHPUT] for d in done],
                      [d["measured"][THROUGHPUT] for d in done], pairs)  # fmt: skip
    resolved = set(pairs)
    unordered = [[done[i]["label"], done[j]["label"]] for i in range(len(done))
                 for j in range(i + 1, len(done)) if (i, j) not in resolved]  # fmt: skip
    return pairs, tau, unordered


def _speedup(d: Doc, full: Doc | None, key: str) -> float | None:
    return None if full is None else d[key][THROUGHPUT] / full[key][THROUGHPUT]


def _config_row(d: Doc, full: Doc | None) -> Doc:
    speedup_m, speedup_p = _speedup(d, full, "measured"), _speedup(d, full, "predicted")
    return {
        "index": d["index"], "label": d["label"], "policy": d["policy"],
        "speedup_measured": speedup_m, "speedup_predicted": speedup_p,
        "speedup_error": relative_error(speedup_p, speedup_m),
        "rouge_l": d["rouge_l"], **d["replay"],
        # the spread the medians hide: each repeated run's throughput and mean TPOT
        "throughput_runs": [r[THROUGHPUT] for r in d["measured_runs"]],
        "tpot_mean_runs_s": [r["tpot_mean_s"] for r in d["measured_runs"]],
        "measured": d["measured"], "predicted": d["predicted"],
        "predicted_probed": d["predicted_probed"],
        # per run: the probe's time over the calibration's median (1.2: 20% slower), and
        # its own steps' seconds over the fit's price of them
        "dilation_runs": d["dilations"], "step_dilation_runs": d["step_dilations"],
        "predicted_hindsight": d["predicted_hindsight"],
    }  # fmt: skip


def summarise(
    cfg: ValidationConfig, done: Sequence[Doc], failed: Sequence[Doc], calibration: Calibration,
    fit_report: Any,
) -> Doc:  # fmt: skip
    errors, tau, worst = _compared(done, "predicted")
    pairs, tau_resolved, unordered = _ordering(done)
    errors_probed, tau_probed, worst_probed = _compared(done, "predicted_probed")
    has_hindsight = all(d["predicted_hindsight"] is not None for d in done)
    errors_hindsight, tau_hindsight, worst_hindsight = (
        _compared(done, "predicted_hindsight") if has_hindsight else ([], None, None)
    )
    noise = [row for d in done for row in noise_rows(
        d["label"], d["measured_runs"], d["predicted"], d["predicted_hindsight"])]  # fmt: skip
    judged = [r["forecast_inside"] for r in noise if r["forecast_inside"] is not None]
    full = next((d for d in done if d["index"] == 0), None)
    configs = [_config_row(d, full) for d in done]
    return {
        "schema_version": VALIDATION_SCHEMA_VERSION,
        "config": to_jsonable(cfg),
        "repeats": cfg.repeats,
        "engine": cfg.engine,
        "workload": cfg.workload,
        "cost_model": calibration.cost_model,
        "reference_probe_s": calibration.reference_probe_s,
        "fit": None if fit_report is None else {"r2": fit_report.r2, "num_steps": fit_report.num_steps,
                                                 "coefficients": fit_report.coefficients},
        "configurations": configs,
        "errors": errors,
        "kendall_tau_throughput": tau,
        "kendall_tau_resolved": tau_resolved,
        "num_pairs_resolved": len(pairs),
        "num_pairs": len(done) * (len(done) - 1) // 2,
        # the measurement's own repeatability, per configuration and goal metric, and the
        # pairs it cannot order (the rounds split on them): no ranking claim is made there
        "noise": noise,
        "forecast_inside_range": sum(judged) / len(judged) if judged else None,
        "unordered_pairs": unordered,
        "max_goal_error": worst,
        # the same comparison with each run predicted at the speed its probes measured
        "errors_probed": errors_probed,
        "kendall_tau_throughput_probed": tau_probed,
        "max_goal_error_probed": worst_probed,
        # in hindsight: each run predicted at the speed its own steps ran (no forecast: what is
        # left is the simulator's error, not the machine's speed)
        "errors_hindsight": errors_hindsight,
        "kendall_tau_throughput_hindsight": tau_hindsight,
        "max_goal_error_hindsight": worst_hindsight,
        "missing": [{"label": f["label"], "message": f["message"]} for f in failed],
    }  # fmt: skip


def write_outputs(out: Path, summary: dict[str, Any], done: Sequence[dict[str, Any]]) -> None:
    write_doc(out / "validation.json", summary)
    if summary["errors"]:
        pq.write_table(pa.Table.from_pylist(summary["errors"]), out / "validation.parquet")
    latencies = [row for d in done for row in d["latencies"]]
    if latencies:
        pq.write_table(pa.Table.from_pylist(latencies), out / "latencies.parquet")
