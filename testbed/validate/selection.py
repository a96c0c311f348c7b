"""Choosing what to validate from a sweep's ranking."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from testbed.core.policy_set import PolicyConfig
from testbed.sweep.results import policy_of, rank_runs
from testbed.validate.config import ValidationError


@dataclass(frozen=True)
class Selection:
    trace: str
    workload: str
    cost_model: str
    policies: tuple[PolicyConfig, ...]


def _apart(rows: Sequence[dict[str, Any]], taken: Sequence[float], min_gap: float,
           limit: int) -> list[dict[str, Any]]:  # fmt: skip
    """Up to ``limit`` rows in order, each with a throughput at least ``min_gap`` (relative)
    from those of ``taken`` and of every row kept before it."""
    kept, seen = [], list(taken)
    for r in rows:
        t = r["throughput_tokens_per_s"]
        if len(kept) < limit and all(abs(t / u - 1.0) >= min_gap for u in seen):
            kept.append(r)
            seen.append(t)
    return kept


def _evenly(rows: Sequence[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """n rows evenly down a best-first list: for n = 2 the middle and the slowest."""
    if n <= 0 or not rows:
        return []
    ends = np.linspace(0, len(rows) - 1, n + 1)[1:]
    return [rows[i] for i in sorted({round(float(x)) for x in ends})]


def _spread(in_group: Sequence[dict[str, Any]], chosen: Sequence[dict[str, Any]],
            base: Sequence[float], min_gap: float, n: int) -> list[dict[str, Any]]:  # fmt: skip
    """n more of the group's early-exit runs, constraint or not, evenly down from the best of
    those not chosen to the slowest; distinct ones (min_gap) first."""

    policies = {policy_of(r) for r in chosen}
    rest = [r for r in rank_runs(in_group, None) if not r["is_baseline"]
            and policy_of(r) not in policies]  # fmt: skip
    taken = [*base, *(r["throughput_tokens_per_s"] for r in chosen)]
    picks = _evenly(_apart(rest, taken, min_gap, len(rest)), n)
    return picks + _evenly([r for r in rest if r not in picks], n - len(picks))


def select_from_sweep(
    sweep_dir: Path, top_k: int, *, workload: str | None = None, cost_model: str | None = None,
    spread: int = 0, min_gap: float = 0.0,
) -> Selection:  # fmt: skip
    """The top k early-exit runs of a sweep's ranking (its quality constraint applied), from one
    workload × cost-model group: the first one, or the one named. ``spread`` more come from
    the rest of that group's runs, evenly down to the slowest: near-ties at the top make a
    rank test measure noise, configurations far apart test whether the ranking holds.

    ``min_gap`` > 0 passes over a run whose simulated throughput is within that fraction of
    `full`'s or of one already chosen (a policy that never exits, two batching policies that
    schedule alike), while enough others are left: a shared machine's medians of one
    configuration wander by a few percent, so a tie is ordered by chance. Slots the distinct
    runs cannot fill go to the passed-over ones, best first."""

    results = Path(sweep_dir) / "results.parquet"
    if not results.is_file():
        raise ValidationError(f"{sweep_dir}: no results.parquet (not a finished sweep?)")
    if top_k < 1 or spread < 0:
        raise ValidationError(f"--top must be >= 1 and --spread >= 0, got {top_k} and {spread}")
    if not 0.0 <= min_gap < 1.0:
        raise ValidationError(f"--min-gap must be in [0, 1), got {min_gap}")
    try:
        rows = pq.read_table(results).to_pylist()
    except (OSError, pa.ArrowInvalid) as exc:
        raise ValidationError(f"{results}: unreadable ({exc})") from None
    info_path = Path(sweep_dir) / "run.json"
    min_agreement = (
        json.loads(info_path.read_text()).get("min_agreement") if info_path.is_file() else None
    )
    ranked = [r for r in rank_runs(rows, min_agreement) if not r["is_baseline"]]
    if workload is not None:
        ranked = [r for r in ranked if r["workload"] == workload]
    if cost_model is not None:
        ranked = [r for r in ranked if r["cost_model"] == cost_model]
    if not ranked:
        raise ValidationError(
            f"{sweep_dir}: the ranking is empty (no early-exit run meets the constraint)"
        )
    first = ranked[0]
    key = (first["workload"], first["cost_model"])
    in_group = [r for r in rows if (r["workload"], r["cost_model"]) == key]
    group = [r for r in ranked if (r["workload"], r["cost_model"]) == key]
    base = [r["throughput_tokens_per_s"] for r in in_group if r["is_baseline"]]
    chosen = _apart(group, base, min_gap, top_k)
    chosen += [r for r in group if r not in chosen][: top_k - len(chosen)]
    chosen.sort(key=group.index)  # best first, as ranked
    if spread:
        chosen += _spread(in_group, chosen, base, min_gap, spread)
    return Selection(
        trace=first["trace"], workload=first["workload"], cost_model=first["cost_model"],
        policies=tuple(policy_of(r) for r in chosen),
    )  # fmt: skip
