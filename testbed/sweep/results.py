"""The finished runs as rows (config columns and metrics, and the inverse: a row's policy),
results.parquet, and the ranking under a quality constraint."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from testbed import atomic
from testbed.core.policy_set import PolicyConfig
from testbed.sim.simulator import SimulationConfig
from testbed.sweep.grid import BASELINE_POLICY, RUN_SCHEMA_VERSION


def config_columns(cfg: SimulationConfig) -> dict[str, Any]:
    p = cfg.policy
    is_baseline = not p.is_early_exit
    return {
        "trace": cfg.trace,
        "workload": cfg.workload,
        "cost_model": cfg.cost_model,
        "policy": p.label(),
        "is_baseline": is_baseline,
        "batching": p.batching,
        "batching_params": json.dumps(dict(p.batching_params), sort_keys=True),
        "rule": None if is_baseline else p.exit_rule,  # the baseline never exits
        "threshold": None if is_baseline else p.threshold,
        "decay_tau": p.decay_tau,
        "min_exit_layer": p.min_exit_layer,
        "exit_stride": p.exit_stride,
        "kv_fill": p.kv_fill,
        "seed": cfg.seed,
    }


def collect_rows(runs_dir: Path, keyed: dict[str, SimulationConfig]) -> list[dict[str, Any]]:
    """One row per finished run of these configs, in config order."""
    rows = []
    for key, cfg in keyed.items():
        metrics = _finished_metrics(runs_dir / f"{key}.json", quiet=True)
        if metrics is not None:
            rows.append({"key": key, **config_columns(cfg), **metrics})
    return rows


def as_run(cfg: SimulationConfig) -> dict[str, Any]:
    """What simulate() resolved that the grid may leave open: results.parquet columns."""
    return {"num_kv_blocks": cfg.num_kv_blocks, "max_model_len": cfg.max_model_len}


def _finished_metrics(path: Path, *, quiet: bool = False) -> dict[str, Any] | None:
    """A finished point's metrics and as_run values; None when it has not run, its file is torn
    (a disk full, a copy cut short) or an older eetb wrote it: that point is run again, with a
    line saying so."""
    try:
        doc = json.loads(path.read_text())
        metrics, version = doc["metrics"], doc.get("schema_version", 1)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if not quiet:
            print(f"eetb: {path.name} is unreadable ({type(exc).__name__}); running that point "
                  "again", file=sys.stderr)  # fmt: skip
        return None
    if version != RUN_SCHEMA_VERSION or not isinstance(metrics, dict):
        if not quiet:
            print(f"eetb: {path.name} is of run schema {version}, not {RUN_SCHEMA_VERSION}; "
                  "running that point again", file=sys.stderr)  # fmt: skip
        return None
    return {**metrics, **doc.get("as_run", {})}


def write_results(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    with atomic.atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(list(rows)), tmp)
    return path


def _group(row: dict[str, Any]) -> tuple[Any, ...]:
    """The runs a speedup compares: same trace, workload, cost model and seed."""
    return row["trace"], row["workload"], row["cost_model"], row["seed"]


def _meets(row: dict[str, Any], min_agreement: float | None) -> bool:
    if min_agreement is None:
        return True
    return row["est_agreement"] is not None and row["est_agreement"] >= min_agreement


def rank_runs(rows: Sequence[dict[str, Any]], min_agreement: float | None) -> list[dict[str, Any]]:
    """Rows meeting the constraint, grouped by workload × cost model in grid order, best
    throughput first, each with `speedup` over its group's `full` run (None if that failed)."""
    base = {_group(r): r["throughput_tokens_per_s"] for r in rows if r["is_baseline"]}
    order = {g: i for i, g in enumerate(dict.fromkeys(map(_group, rows)))}
    kept = sorted(
        (r for r in rows if _meets(r, min_agreement)),
        key=lambda r: (order[_group(r)], -r["throughput_tokens_per_s"]),
    )
    ranked = []
    for r in kept:
        base_per_s = base.get(_group(r))
        speedup = None if base_per_s is None else r["throughput_tokens_per_s"] / base_per_s
        ranked.append({**r, "speedup": speedup})
    return ranked


def policy_of(row: dict[str, Any]) -> PolicyConfig:
    """The PolicyConfig of a results row: the inverse of config_columns."""
    if row["is_baseline"]:
        return BASELINE_POLICY
    params = tuple(sorted(json.loads(row["batching_params"] or "{}").items()))
    return PolicyConfig(
        batching=row["batching"], batching_params=params, exit_rule=row["rule"],
        threshold=row["threshold"], min_exit_layer=row["min_exit_layer"],
        exit_stride=row["exit_stride"], kv_fill=row["kv_fill"], decay_tau=row["decay_tau"],
    )  # fmt: skip
