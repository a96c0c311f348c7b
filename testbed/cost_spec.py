"""A cost model as the CLI, sweep results and validation results name it, parsed once.

``CostModelSpec.parse`` reads the text forms; ``str(spec)`` writes them back, so a spec stored in
results.parquet or validation.json reads back equal. ``testbed.sim.cost_model.build_cost_model``
builds the model a spec names; the report shortens one with ``short()``. Pure text: no numpy,
no trace, so the analysis side can read specs without the simulator.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace

from testbed.errors import EetbError

KINDS = ("fitted", "roofline", "profile")
SPEC_FORMS = (
    "fitted:[F*]PATH[+[F*]PATH...], roofline:GPU[:MODEL], profile:CSV[:MODEL], "
    "each optionally F*SPEC (step times x F)"
)
_FACTOR = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*\*(.*)$", re.DOTALL)


class CostModelError(EetbError):
    """A cost model cannot be built or cannot price a step: bad spec, file, fit or shape."""


@dataclass(frozen=True)
class FitSource:
    """One capture a fitted model learns from; its step durations x time_factor (a capture made
    while the machine ran 1/F of the reference speed)."""

    path: str
    time_factor: float = 1.0

    def __str__(self) -> str:
        return _scaled(self.time_factor, self.path)


@dataclass(frozen=True)
class CostModelSpec:
    kind: str  # one of KINDS
    target: str = ""  # roofline: the GPU; profile: the CSV file; fitted: unused
    model: str = ""  # roofline, profile: a model preset; "": the trace's own model
    sources: tuple[FitSource, ...] = ()  # fitted: the captures, in order
    time_factor: float = 1.0  # every step time x this (1.25: 25% slower)

    @classmethod
    def parse(cls, text: str) -> CostModelSpec:
        factor, rest = _split_factor(text)
        kind, _, arg = rest.strip().partition(":")
        kind = kind.lower()
        if kind not in KINDS:
            raise CostModelError(f"unknown cost model {text!r}; known: {SPEC_FORMS}")
        if not arg:
            raise CostModelError(f"cost model {text!r} lacks its argument; forms: {SPEC_FORMS}")
        if kind == "fitted":
            sources = tuple(FitSource(p, f) for f, p in map(_split_factor, arg.split("+")))
            return cls(kind, sources=sources, time_factor=factor)
        if kind == "roofline":
            gpu, _, model = arg.partition(":")
            return cls(kind, gpu, model, time_factor=factor)
        path, _, model = arg.rpartition(":")
        if not path or "/" in model or model.lower().endswith(".csv"):  # a ':' inside the path
            path, model = arg, ""
        return cls(kind, path, model, time_factor=factor)

    def __str__(self) -> str:
        if self.kind == "fitted":
            body = "fitted:" + "+".join(str(s) for s in self.sources)
        else:
            body = ":".join(p for p in (self.kind, self.target, self.model) if p)
        return _scaled(self.time_factor, body)

    @property
    def prices_this_engine(self) -> bool:
        """A fit prices the engine its captures ran on (this machine's); the others price a
        model on hardware we may not have."""
        return self.kind == "fitted"

    def scaled(self, factor: float) -> CostModelSpec:
        """The same model on a machine at 1/factor of its speed."""
        return replace(self, time_factor=self.time_factor * factor)

    def unscaled(self) -> CostModelSpec:
        return replace(self, time_factor=1.0)

    def short(self) -> str:
        """The spec for a table: a fit over many captures as their count and common folder."""
        if self.kind != "fitted" or len(self.sources) < 3:
            return str(self)
        common = os.path.commonpath([s.path for s in self.sources])
        return _scaled(self.time_factor,
                       f"fitted on {len(self.sources)} calibration captures under {common}")  # fmt: skip


def _split_factor(text: str) -> tuple[float, str]:
    """``"1.25*rest"`` -> (1.25, "rest"); no leading factor -> (1.0, text)."""
    match = _FACTOR.match(text)
    if match is None:
        return 1.0, text
    factor = float(match.group(1))
    if not (math.isfinite(factor) and factor > 0):
        raise CostModelError(f"time factor in {text!r} must be finite and > 0")
    return factor, match.group(2)


def _scaled(factor: float, body: str) -> str:
    # five decimals: what a validation's per-run factors are written with
    return body if factor == 1.0 else f"{factor:.5f}*{body}"
