"""Predicted against measured: relative errors, rank agreement and exit-layer distributions.

Pure functions over plain numbers, so `eetb validate` and its tests share them.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from testbed.validation_records import ErrorRow, NoiseRow

# (metrics key, label, scale to the label's unit); throughput and mean TPOT carry the goals
COMPARED_METRICS = (
    ("throughput_tokens_per_s", "throughput tok/s", 1.0),
    ("tpot_mean_s", "mean TPOT ms", 1e3),
    ("ttft_mean_s", "mean TTFT ms", 1e3),
    ("e2e_mean_s", "mean end-to-end ms", 1e3),
    ("tpot_p90_s", "TPOT p90 ms", 1e3),
    ("ttft_p90_s", "TTFT p90 ms", 1e3),
    ("e2e_p99_s", "end-to-end p99 ms", 1e3),
)
GOAL_METRICS = ("throughput_tokens_per_s", "tpot_mean_s")


def relative_error(predicted: float | None, measured: float | None) -> float | None:
    """predicted / measured - 1; None where either is missing or measured is zero."""
    if predicted is None or measured is None or measured == 0:
        return None
    return predicted / measured - 1.0


def error_rows(
    label: str, predicted: Mapping[str, Any], measured: Mapping[str, Any]
) -> list[ErrorRow]:
    """One row per compared metric of one configuration, in the metric's display unit."""
    rows = []
    for key, name, scale in COMPARED_METRICS:
        pred, real = predicted.get(key), measured.get(key)
        rows.append(ErrorRow(
            policy=label, metric=key, metric_label=name,
            predicted=None if pred is None else pred * scale,
            measured=None if real is None else real * scale,
            error=relative_error(pred, real),
        ))  # fmt: skip
    return rows


def kendall_tau(
    a: Sequence[float], b: Sequence[float], pairs: Sequence[tuple[int, int]] | None = None
) -> float | None:
    """Kendall's tau-b between two scorings of the same items (ties in either count as neither
    concordant nor discordant), over every pair or over ``pairs`` (i < j) only; None for fewer
    than two items or a constant scoring."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} against {len(b)} items")
    concordant = discordant = ties_a = ties_b = 0
    if pairs is None:
        pairs = [(i, j) for i in range(len(a)) for j in range(i + 1, len(a))]
    for i, j in pairs:
        da, db = a[i] - a[j], b[i] - b[j]
        if da == 0 and db == 0:
            continue
        if da == 0:
            ties_a += 1
        elif db == 0:
            ties_b += 1
        elif (da > 0) == (db > 0):
            concordant += 1
        else:
            discordant += 1
    n0 = concordant + discordant
    denominator = ((n0 + ties_a) * (n0 + ties_b)) ** 0.5
    return None if denominator == 0 else (concordant - discordant) / denominator


def resolved_pairs(
    runs: Sequence[Sequence[float]], min_share: float = 0.8
) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, of items measured in rounds (``runs[i][k]``: item i in round k)
    whose order is the same in at least ``min_share`` of the rounds both have (3 at least).
    A round runs every item once, seconds apart, so a pair's order within a round is little
    moved by the machine's slow spells; a pair the rounds split on is one this measurement
    cannot order, whatever a simulator predicts."""
    pairs = []
    for i in range(len(runs)):
        for j in range(i + 1, len(runs)):
            both = [(x, y) for x, y in zip(runs[i], runs[j], strict=False)
                    if x is not None and y is not None]  # fmt: skip
            if len(both) < 3:
                continue
            above = sum(x > y for x, y in both)
            below = sum(x < y for x, y in both)
            if max(above, below) >= min_share * len(both):
                pairs.append((i, j))
    return pairs


def noise_floor(values: Sequence[float | None]) -> dict[str, float | None]:
    """How repeatable one configuration's measurement is, over its rounds: the median, the
    median absolute deviation over the median (the noise floor a forecast's error is held to)
    and the min-max range. With one round the spread is unknown (None)."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return {"median": None, "mad_rel": None, "low": None, "high": None}
    median = statistics.median(v)
    mad = statistics.median(abs(x - median) for x in v) if len(v) > 1 else None
    return {"median": median, "mad_rel": None if mad is None or median == 0 else mad / median,
            "low": min(v), "high": max(v)}  # fmt: skip


def noise_rows(
    label: str, runs: Sequence[Mapping[str, Any]], predicted: Mapping[str, Any],
    hindsight: Mapping[str, Any] | None,
) -> list[NoiseRow]:  # fmt: skip
    """Per goal metric of one configuration: its rounds' noise floor, whether the forecast
    (and the hindsight prediction) lies inside the measured range, and the forecast's error in
    units of the noise floor (below 1: inside what the machine's own repeatability allows)."""
    rows = []
    for key in GOAL_METRICS:
        floor = noise_floor([r.get(key) for r in runs])
        pred = predicted.get(key)
        post = None if hindsight is None else hindsight.get(key)
        error = relative_error(pred, floor["median"])
        inside = (
            None if pred is None or floor["low"] is None else floor["low"] <= pred <= floor["high"]
        )
        post_inside = (None if post is None or floor["low"] is None
                       else floor["low"] <= post <= floor["high"])  # fmt: skip
        mad = floor["mad_rel"]
        rows.append(NoiseRow(
            policy=label, metric=key, **floor, predicted=pred,
            forecast_inside=inside, hindsight_inside=post_inside,
            error_over_noise=None if error is None or not mad else abs(error) / mad,
        ))  # fmt: skip
    return rows


def exit_histogram(exit_layers: Sequence[int], num_layers: int) -> list[float]:
    """Fraction of tokens taken at each layer 1..num_layers."""
    counts = [0] * num_layers
    for layer in exit_layers:
        if not 1 <= layer <= num_layers:
            raise ValueError(f"exit layer {layer} outside 1..{num_layers}")
        counts[layer - 1] += 1
    total = sum(counts)
    return [c / total for c in counts] if total else counts


def total_variation(p: Sequence[float], q: Sequence[float]) -> float:
    """Half the L1 distance between two distributions over the same layers: 0 same, 1 disjoint."""
    if len(p) != len(q):
        raise ValueError(f"distributions over {len(p)} and {len(q)} layers")
    return 0.5 * sum(abs(x - y) for x, y in zip(p, q, strict=True))
