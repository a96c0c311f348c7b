"""Speedups within comparable groups of sweep runs, and Pareto fronts of speed against quality."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _group(row: dict[str, Any]) -> tuple[Any, ...]:
    # runs are comparable within one trace × workload × cost model × seed (as in the sweep)
    return row["trace"], row["workload"], row["cost_model"], row["seed"]


def with_speedups(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row with `speedup`: throughput over its group's `full` run (None without one)."""
    base = {_group(r): r["throughput_tokens_per_s"] for r in rows if r["is_baseline"]}
    out = []
    for r in rows:
        b = base.get(_group(r))
        out.append({**r, "speedup": None if not b else r["throughput_tokens_per_s"] / b})
    return out


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both coordinates (higher is better on each), by x."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(set(points), key=lambda p: (-p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return sorted(front)


def first_group(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """The rows of the first workload × cost model of a sweep (a figure's one comparable set),
    and a title naming that workload."""
    if not rows:
        return [], ""
    key = _group(rows[0])
    return [r for r in rows if _group(r) == key], rows[0]["workload"]
