"""validation.json: every configuration's comparison summarised, with the error tables, the
Kendall taus, the noise floor and what is missing."""

from __future__ import annotations

import dataclasses
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
from testbed.validate.config import ValidationConfig
from testbed.validate.runs import write_doc
from testbed.validate.speed import Calibration
from testbed.validation_records import (
    Comparison,
    ConfigResult,
    FitSummary,
    Missing,
    ValidationResults,
)

Doc = dict[str, Any]
THROUGHPUT = "throughput_tokens_per_s"


def _compared(done: Sequence[Doc], key: str) -> Comparison:
    """Error rows, Kendall tau of throughput and the largest goal error of predictions ``key``
    (all at the reference speed, each run at its probed speed, or in hindsight at the speed
    its steps ran)."""
    if any(d[key] is None for d in done):
        return Comparison()  # some run's speed is unknown: no such prediction
    rows = tuple(row for d in done for row in error_rows(d["label"], d[key], d["measured"]))
    tau = kendall_tau([d[key][THROUGHPUT] for d in done], [d["measured"][THROUGHPUT] for d in done])
    goal = [abs(r.error) for r in rows if r.metric in GOAL_METRICS and r.error is not None]
    return Comparison(rows, tau, max(goal) if goal else None)


def _ordering(
    done: Sequence[Doc],
) -> tuple[list[tuple[int, int]], float | None, list[tuple[str, str]]]:
    """The pairs whose order the rounds agree on (4 of 5), Kendall tau over them alone (None
    when no pair is resolved: what tau misses beyond them is noise), and the pairs the rounds
    cannot order (no ranking claim is made there)."""
    pairs = resolved_pairs([[r[THROUGHPUT] for r in d["measured_runs"]] for d in done])
    tau = kendall_tau([d["predicted"][THROUGHPUT] for d in done],
                      [d["measured"][THROUGHPUT] for d in done], pairs)  # fmt: skip
    resolved = set(pairs)
    unordered = [(done[i]["label"], done[j]["label"]) for i in range(len(done))
                 for j in range(i + 1, len(done)) if (i, j) not in resolved]  # fmt: skip
    return pairs, tau, unordered


def _speedup(d: Doc, full: Doc | None, key: str) -> float | None:
    return None if full is None else d[key][THROUGHPUT] / full[key][THROUGHPUT]


def _config_result(d: Doc, full: Doc | None) -> ConfigResult:
    speedup_m, speedup_p = _speedup(d, full, "measured"), _speedup(d, full, "predicted")
    replay = d["replay"]
    return ConfigResult(
        index=d["index"], label=d["label"], policy=d["policy"],
        measured=d["measured"], predicted=d["predicted"],
        predicted_probed=d["predicted_probed"], predicted_hindsight=d["predicted_hindsight"],
        exit_hist_measured=tuple(replay["exit_hist_measured"]),
        exit_hist_predicted=tuple(replay["exit_hist_predicted"]),
        exit_hist_tv=replay["exit_hist_tv"],
        mean_exit_layer_measured=replay["mean_exit_layer_measured"],
        mean_exit_layer_predicted=replay["mean_exit_layer_predicted"],
        agreement_measured=replay["agreement_measured"],
        agreement_predicted=replay["agreement_predicted"],
        speedup_measured=speedup_m, speedup_predicted=speedup_p,
        speedup_error=relative_error(speedup_p, speedup_m), rouge_l=d["rouge_l"],
        throughput_runs=tuple(r[THROUGHPUT] for r in d["measured_runs"]),
        tpot_mean_runs_s=tuple(r["tpot_mean_s"] for r in d["measured_runs"]),
        dilation_runs=tuple(d["dilations"]), step_dilation_runs=tuple(d["step_dilations"]),
        cpu_share_runs=tuple(d["cpu_shares"]),
    )  # fmt: skip


def summarise(
    cfg: ValidationConfig, done: Sequence[Doc], failed: Sequence[Doc], calibration: Calibration,
    fit_report: Any,
) -> ValidationResults:  # fmt: skip
    pairs, tau_resolved, unordered = _ordering(done)
    noise = tuple(row for d in done for row in noise_rows(
        d["label"], d["measured_runs"], d["predicted"], d["predicted_hindsight"]))  # fmt: skip
    judged = [r.forecast_inside for r in noise if r.forecast_inside is not None]
    full = next((d for d in done if d["index"] == 0), None)
    fit = None if fit_report is None else FitSummary(
        fit_report.r2, fit_report.num_steps, dict(fit_report.coefficients))  # fmt: skip
    return ValidationResults(
        engine=cfg.engine, workload=cfg.workload, cost_model=calibration.cost_model,
        configurations=tuple(_config_result(d, full) for d in done),
        forecast=_compared(done, "predicted"), probed=_compared(done, "predicted_probed"),
        hindsight=_compared(done, "predicted_hindsight"),
        fit=fit, repeats=cfg.repeats, reference_probe_s=calibration.reference_probe_s,
        noise=noise, forecast_inside_range=sum(judged) / len(judged) if judged else None,
        kendall_tau_resolved=tau_resolved, num_pairs_resolved=len(pairs),
        num_pairs=len(done) * (len(done) - 1) // 2, unordered_pairs=tuple(unordered),
        missing=tuple(Missing(f["label"], f["message"]) for f in failed),
        config=to_jsonable(cfg),
    )  # fmt: skip


def write_outputs(out: Path, results: ValidationResults, done: Sequence[dict[str, Any]]) -> None:
    write_doc(out / "validation.json", results.to_json())
    if results.forecast.errors:
        rows = [dataclasses.asdict(r) for r in results.forecast.errors]
        pq.write_table(pa.Table.from_pylist(rows), out / "validation.parquet")
    latencies = [row for d in done for row in d["latencies"]]
    if latencies:
        pq.write_table(pa.Table.from_pylist(latencies), out / "latencies.parquet")
