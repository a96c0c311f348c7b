"""The machine's speed around each run: speed probes, the calibration's reference speed,
and how much slower a run was (by its probes, and in hindsight by its own steps)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from testbed.cost_spec import CostModelSpec, FitSource
from testbed.sim.cost_model import FittedCostModel, price_capture_s
from testbed.trace import Capture


def speed_file(run: Path) -> Path:
    return run.with_name(f"{run.name}.speed.json")


def probe_time_s(run: Path) -> float | None:
    """The median of the probes around a run; None for a run made without them.

    The machine's speed wanders over tens of seconds (5-s means of back-to-back probes here:
    0.89-1.12 of their median, lag-1 autocorrelation 0.63), and one 0.2-s probe scatters
    +-15% about that level. In a 60-s series the 5-s mean a run sees was estimated within
    sd 7.6% by the faster of one probe on each side, within 4.7% by the median of three on
    each side. A median also ignores a momentary spike: the mean of one probe on each side once
    scaled a whole calibration run by 0.62 (probes 0.198 s and 0.082 s). A file of an older
    run holds one probe (a number) on each side."""
    file = speed_file(Path(run))
    if not file.is_file():
        return None
    doc = json.loads(file.read_text())
    probes = [x for side in ("before_s", "after_s") for x in np.atleast_1d(doc[side]).tolist()]
    return float(np.median(probes))


@dataclass(frozen=True)
class Calibration:
    cost_model: str  # a CostModelSpec: fitted on the calibration runs, at the reference speed
    reference_probe_s: float | None  # their median probe time; None: runs made unprobed


def fitted_at_reference(dirs: Sequence[str]) -> Calibration:
    """The fitted spec over calibration runs, each run's durations scaled to the median probe
    time of them all (``F*DIR``, F = reference / its probe time). Unprobed runs (given with
    --calibration from elsewhere) are fitted as they are."""
    probes = [probe_time_s(Path(d)) for d in dirs]
    if any(p is None for p in probes):
        return Calibration(str(CostModelSpec("fitted", sources=tuple(map(FitSource, dirs)))), None)
    reference = float(np.median(probes))
    sources = tuple(FitSource(d, reference / p) for d, p in zip(dirs, probes, strict=True))
    return Calibration(str(CostModelSpec("fitted", sources=sources)), reference)


def dilation(run: Path, calibration: Calibration) -> float:
    """How much slower than the calibration's reference the machine was around this run."""
    probe = probe_time_s(run)
    if probe is None or calibration.reference_probe_s is None:
        return 1.0
    return probe / calibration.reference_probe_s


def step_dilation(run: Path, fit: object) -> float | None:
    """How much longer a run's own steps took than the fit prices them at (1.2: 20% longer);
    None when the cost model cannot price recorded steps or the run has none."""
    if not isinstance(fit, FittedCostModel):
        return None
    priced_s, measured_s = price_capture_s(fit, run)
    return measured_s / priced_s if priced_s > 0 else None


def cpu_share(capture: Capture) -> float | None:
    """The process's CPU seconds over its wall seconds across a run's steps (schema 4 steps
    carry both): about the engine's threads where it had the cores to itself, lower where it
    waited for a core on a shared machine. None for a capture that did not measure it."""
    steps = capture.steps
    if steps.num_rows == 0 or steps["cpu_s"].null_count:
        return None
    wall_s = float(pc.sum(steps["duration_s"]).as_py())
    return float(pc.sum(steps["cpu_s"]).as_py()) / wall_s if wall_s > 0 else None


@dataclass(frozen=True)
class RunSpeed:
    """How much slower than the calibration's reference speed the machine ran one measured run
    (1.0: at the reference speed; 1.2: 20% slower)."""

    probed: float  # its speed probes' median over the reference's: known beside the run
    steps: float | None  # its steps' seconds over the fit's price of them: known only after it
