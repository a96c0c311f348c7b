"""The report's figures, one function each: rows of result files in, one PNG out.

Each returns the path written, or None when the rows hold nothing to draw (the report then says
so). matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from analysis.rank import first_group, pareto_front, with_speedups  # noqa: E402
from testbed.validation_records import ConfigResult, ValidationResults  # noqa: E402

DPI = 110


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def speedup_vs_lambda(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Speedup over `full` against λ, one panel per exit rule, one line per batching policy
    (the sweep's first workload × cost model)."""
    group, workload = first_group(rows)
    ranked = [r for r in with_speedups(group) if not r["is_baseline"] and r["speedup"] is not None]
    rules = sorted({r["rule"] for r in ranked})
    if not rules:
        return None
    fig, axes = plt.subplots(1, len(rules), figsize=(4.2 * len(rules), 3.4), squeeze=False)
    for ax, rule in zip(axes[0], rules, strict=True):
        lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for r in ranked:
            if r["rule"] == rule:
                key = f"{r['batching']} (from layer {r['min_exit_layer']})"
                lines[key].append((r["threshold"], r["speedup"]))
        for key, points in sorted(lines.items()):
            points.sort()
            ax.plot(*zip(*points, strict=True), marker="o", label=key)
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set(title=f"rule: {rule}", xlabel="threshold λ", ylabel="speedup over full")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    fig.suptitle(workload, fontsize=8)
    return _save(fig, path)


def quality_vs_speedup(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Estimated agreement with full depth against speedup; the Pareto front of each policy
    (the sweep's first workload × cost model)."""
    group, workload = first_group(rows)
    ranked = [r for r in with_speedups(group)
              if r["speedup"] is not None and r["est_agreement"] is not None]  # fmt: skip
    if not ranked:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.2))
    by_policy: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in ranked:
        by_policy[r["batching"]].append((r["speedup"], r["est_agreement"]))
    for i, (name, points) in enumerate(sorted(by_policy.items())):
        color = f"C{i}"
        ax.scatter(*zip(*points, strict=True), color=color, alpha=0.45, s=18)
        front = pareto_front(points)
        ax.plot(*zip(*front, strict=True), color=color, marker="o", label=name)
    ax.set(xlabel="speedup over full (simulated)", ylabel="estimated agreement with full depth")
    ax.set_title(workload, fontsize=8)
    ax.legend(fontsize=8)
    return _save(fig, path)


_RATE = re.compile(r"(?:rate|scale)=([0-9.]+)")


def offered_load(workload: str) -> float | None:
    """The rate (or time scale) of a workload string, the x of a load curve."""
    m = _RATE.search(workload)
    return float(m.group(1)) if m else None


def throughput_vs_load(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Throughput against offered load: each batching policy's best run at each load."""
    best: dict[tuple[str, float], float] = {}
    for r in rows:
        load = offered_load(r["workload"])
        if load is None:
            continue
        key = (r["batching"], load)
        best[key] = max(best.get(key, 0.0), r["throughput_tokens_per_s"])
    if len({load for _, load in best}) < 2:
        return None  # one load: no curve
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name in sorted({b for b, _ in best}):
        points = sorted((load, v) for (b, load), v in best.items() if b == name)
        ax.plot(*zip(*points, strict=True), marker="o", label=name)
    ax.set(xlabel="offered load (rate or time scale)", ylabel="throughput (tokens/s)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def exit_histograms(configs: Sequence[ConfigResult], path: Path) -> Path | None:
    """Exit-layer distributions: measured (live run) beside predicted (oracle replay)."""
    shown = [c for c in configs if c.label != "full"]
    if not shown:
        return None
    fig, axes = plt.subplots(1, len(shown), figsize=(4.0 * len(shown), 3.2), squeeze=False)
    for ax, c in zip(axes[0], shown, strict=True):
        layers = range(1, len(c.exit_hist_measured) + 1)
        ax.bar([x - 0.2 for x in layers], c.exit_hist_measured, width=0.4, label="measured")
        ax.bar([x + 0.2 for x in layers], c.exit_hist_predicted, width=0.4, label="simulated")
        ax.set(title=c.label, xlabel="exit layer", ylabel="fraction of tokens")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=7)
    return _save(fig, path)


def latency_cdfs(latencies: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """TTFT and TPOT CDFs per configuration: measured solid, simulated dashed."""
    if not latencies:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = list(dict.fromkeys(r["policy"] for r in latencies))
    for ax, metric, title in ((axes[0], "ttft_s", "TTFT"), (axes[1], "tpot_s", "TPOT")):
        for i, label in enumerate(labels):
            for source, style in (("measured", "-"), ("simulated", "--")):
                values = sorted(1e3 * r[metric] for r in latencies
                                if r["policy"] == label and r["source"] == source
                                and r[metric] is not None)  # fmt: skip
                if values:
                    ys = [(k + 1) / len(values) for k in range(len(values))]
                    ax.step(values, ys, where="post", ls=style, color=f"C{i}",
                            label=f"{label} ({source})")  # fmt: skip
        ax.set(title=f"{title} CDF", xlabel=f"{title} (ms)", ylabel="fraction of requests")
    axes[1].legend(fontsize=6)
    return _save(fig, path)


def simulated_vs_measured(validation: ValidationResults, path: Path) -> Path | None:
    """Predicted against measured throughput and mean TPOT, with the y = x line: the forecast
    (filled) and, where the validation has it, the hindsight prediction at each run's own speed
    (hollow, same colour)."""
    panels = (
        ("throughput_tokens_per_s", "throughput (tokens/s)"),
        ("tpot_mean_s", "mean TPOT (ms)"),
    )
    errors, hindsight = validation.forecast.errors, validation.hindsight.errors
    if not any(r.metric == m for r in errors for m, _ in panels):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, (metric, title) in zip(axes, panels, strict=True):
        pts = [(r.measured, r.predicted, r.policy) for r in errors
               if r.metric == metric and r.measured is not None and r.predicted is not None]  # fmt: skip
        later = {r.policy: r.predicted for r in hindsight
                 if r.metric == metric and r.predicted is not None}  # fmt: skip
        for i, (x, y, label) in enumerate(pts):
            ax.scatter([x], [y], color=f"C{i}", label=label)
            if label in later:
                ax.scatter([x], [later[label]], facecolors="none", edgecolors=f"C{i}",
                           label="hollow: in hindsight" if i == 0 else None)  # fmt: skip
        if pts:
            ys = [y for _, y, _ in pts] + list(later.values())
            lo = min(min(x for x, _, _ in pts), *ys) * 0.9
            hi = max(max(x for x, _, _ in pts), *ys) * 1.1
            ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, label="y = x")
            ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="grey",
                            alpha=0.12, label="±10%")  # fmt: skip
        ax.set(title=title, xlabel="measured", ylabel="simulated")
    axes[1].legend(fontsize=6)
    return _save(fig, path)
