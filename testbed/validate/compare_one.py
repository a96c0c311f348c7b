"""One configuration: measured (median over its rounds) against predicted at the reference
speed, at each run's probed speed, and in hindsight at the speed its steps ran."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from testbed.compare import (
    exit_histogram,
    total_variation,
)
from testbed.core.policy_set import PolicyConfig
from testbed.cost_spec import CostModelSpec
from testbed.runinfo import to_jsonable
from testbed.sim.metrics import compute_metrics
from testbed.sim.simulator import SimulationConfig, simulate
from testbed.trace import Capture
from testbed.validate.measured import (
    _latency_rows,
    agreement_with,
    capture_outputs,
    live_records,
)
from testbed.validate.runs import EngineRuns
from testbed.validate.speed import RunSpeed, cpu_share


def _median_metrics(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per metric, the median over repeated runs (None where any run has none)."""
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        out[key] = None if any(v is None for v in values) else float(np.median(values))
    return out


def _simulate_at(engine: EngineRuns, policy: PolicyConfig, oracle: str, cost_model: str,
                 factor: float):  # fmt: skip
    cfg = engine.cfg
    spec = str(CostModelSpec.parse(cost_model).scaled(factor))
    return simulate(SimulationConfig(
        trace=oracle, workload=cfg.workload, policy=policy, cost_model=spec,
        scheduler=engine.scheduler, seed=cfg.seed, data_dir=cfg.data_dir,
        max_model_len=engine.max_model_len, **engine.kv_blocks,
    ))  # fmt: skip


def _predicted_at(engine: EngineRuns, policy: PolicyConfig, oracle: str, cost_model: str,
                  factors: Sequence[float | None]) -> dict[str, Any] | None:  # fmt: skip
    """The median over runs, each simulated with step times x its factor; None when a run's
    factor is unknown."""
    if any(f is None for f in factors):
        return None
    sims = [_simulate_at(engine, policy, oracle, cost_model, f) for f in factors]
    return _median_metrics([sim.metrics.to_dict() for sim in sims])


def _validate_one(
    index: int, policy: PolicyConfig, engine: EngineRuns, oracle: str, cost_model: str,
    lives: Sequence[Capture], speeds: Sequence[RunSpeed],
    full_outputs: dict[int, list[int]] | None, references: dict[int, str] | None,
) -> dict[str, Any]:  # fmt: skip
    """Measured (median over the repeated live runs) against predicted (at the calibration's
    reference speed), predicted_probed (median over the same runs, each simulated at the
    speed its probes saw) and predicted_hindsight (each at the speed its own steps ran), for
    one configuration. Quality and agreement come from the first run; measured exit layers and
    latencies pool every run."""
    records_by_run = [live_records(live) for live in lives]
    per_run = [compute_metrics(records, []).to_dict() for records in records_by_run]
    measured = _median_metrics(per_run)
    records = [r for run in records_by_run for r in run]
    sim = _simulate_at(engine, policy, oracle, cost_model, 1.0)
    predicted = sim.metrics.to_dict()
    predicted_probed = _predicted_at(engine, policy, oracle, cost_model,
                                     [x.probed for x in speeds])  # fmt: skip
    predicted_hindsight = _predicted_at(engine, policy, oracle, cost_model,
                                        [x.steps for x in speeds])  # fmt: skip
    outputs = capture_outputs(lives[0])
    num_layers = lives[0].num_layers
    hist_real = exit_histogram([x for r in records for x in r.exit_layers], num_layers)
    hist_sim = exit_histogram([x for r in sim.requests for x in r.exit_layers], num_layers)
    if index == 0:
        measured_agreement = 1.0  # `full` itself
    else:  # None when the `full` run failed: nothing to agree with
        measured_agreement = None if full_outputs is None else agreement_with(outputs, full_outputs)
    rouge_l = None
    if references:
        from testbed.quality import rouge

        rids = sorted(r for r in outputs if r in references)
        if rids:
            texts = [engine.decode(outputs[r]) for r in rids]
            rouge_l = rouge(texts, [references[r] for r in rids]).rougeL
    replay = {
        "exit_hist_measured": hist_real,
        "exit_hist_predicted": hist_sim,
        "exit_hist_tv": total_variation(hist_real, hist_sim),
        "mean_exit_layer_measured": measured["mean_exit_layer"],
        "mean_exit_layer_predicted": sim.metrics.mean_exit_layer,
        "agreement_measured": measured_agreement,
        "agreement_predicted": sim.metrics.est_agreement,
    }
    return {
        "index": index, "policy": to_jsonable(policy), "label": policy.label(),
        "measured": measured, "measured_runs": per_run, "predicted": predicted,
        "predicted_probed": predicted_probed, "predicted_hindsight": predicted_hindsight,
        "dilations": [x.probed for x in speeds], "step_dilations": [x.steps for x in speeds],
        "cpu_shares": [cpu_share(live) for live in lives],
        "rouge_l": rouge_l, "replay": replay,
        "latencies": _latency_rows(policy.label(), "measured", records)
        + _latency_rows(policy.label(), "simulated", sim.requests),
        "outputs": outputs if index == 0 else None,  # `full`'s, for the others' agreement
    }  # fmt: skip
