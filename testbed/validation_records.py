"""The results of `eetb validate` as frozen records: what validation.json holds.

`testbed.validate` builds them, `analysis` reads them back through ``ValidationResults.read``;
neither side names a JSON key. Torch-free and import-light, so the report needs no engine.
The JSON layout is the records' own (``dataclasses.asdict``); ``from_json`` rebuilds them from
their type hints, so a field added here is written and read with no other change. A document
of another schema version, or one missing a field that has no default, is refused with a
``ResultsError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from testbed.errors import EetbError
from testbed.jsonfile import read_object

VALIDATION_SCHEMA_VERSION = 2  # 2: the three comparisons nested, not flattened into suffixed keys
Metrics = dict[str, float | None]  # testbed.sim.metrics.Metrics.to_dict(): name -> value


class ResultsError(EetbError):
    """A validation results document that cannot be read: another schema, a missing field."""


@dataclass(frozen=True)
class ErrorRow:
    """One metric of one configuration, predicted against measured, in the metric's unit."""

    policy: str  # the configuration's label
    metric: str  # its key in Metrics
    metric_label: str  # the display name, with its unit
    predicted: float | None
    measured: float | None
    error: float | None  # predicted / measured - 1


def chance_inside_range(num_rounds: int) -> float:
    """How often a perfect forecast lands inside the range of ``num_rounds`` measured rounds: one
    more draw of the same noise falls between the min and max of n draws with probability
    (n - 1) / (n + 1), whatever the noise's law (50% at 3 rounds; 90% needs 19)."""
    return (num_rounds - 1) / (num_rounds + 1) if num_rounds >= 2 else 0.0


@dataclass(frozen=True)
class NoiseRow:
    """How repeatable one goal metric of one configuration is over its rounds, and whether the
    forecast (and the hindsight prediction) falls inside what the rounds measured."""

    policy: str
    metric: str
    median: float | None
    mad_rel: float | None  # median absolute deviation / median: the noise floor
    low: float | None
    high: float | None
    predicted: float | None
    forecast_inside: bool | None
    hindsight_inside: bool | None
    error_over_noise: float | None  # |forecast error| / mad_rel


@dataclass(frozen=True)
class Comparison:
    """Every configuration's errors under one prediction, and what they add up to."""

    errors: tuple[ErrorRow, ...] = ()
    kendall_tau_throughput: float | None = None
    max_goal_error: float | None = None  # largest |error| of throughput and mean TPOT

    def error_of(self, policy: str, metric: str) -> float | None:
        return next(
            (r.error for r in self.errors if (r.policy, r.metric) == (policy, metric)), None
        )


@dataclass(frozen=True)
class FitSummary:
    """The fitted cost model's quality."""

    r2: float
    num_steps: int
    coefficients: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Missing:
    """A configuration the engine could not run, and why."""

    label: str
    message: str


@dataclass(frozen=True)
class ConfigResult:
    """One validated configuration: measured (median over its rounds) against simulated."""

    index: int  # 0: `full`
    label: str
    policy: dict[str, Any]  # the PolicyConfig's fields
    measured: Metrics
    predicted: Metrics  # at the calibration's reference speed (the forecast)
    exit_hist_measured: tuple[float, ...]  # fraction of tokens per exit layer 1..L
    exit_hist_predicted: tuple[float, ...]
    exit_hist_tv: float
    mean_exit_layer_measured: float | None
    mean_exit_layer_predicted: float | None
    predicted_probed: Metrics | None = None  # each run at the speed its probes saw
    predicted_hindsight: Metrics | None = None  # each run at the speed its steps ran
    speedup_measured: float | None = None  # over `full`; None when `full` failed
    speedup_predicted: float | None = None
    speedup_error: float | None = None
    rouge_l: float | None = None
    agreement_measured: float | None = None  # fraction of tokens equal to `full`'s output
    agreement_predicted: float | None = None
    # the spread the medians hide: each round's throughput and mean TPOT, and the machine's
    # speed then (probe time over the reference; the steps' seconds over the fit's price)
    throughput_runs: tuple[float, ...] = ()
    tpot_mean_runs_s: tuple[float | None, ...] = ()
    dilation_runs: tuple[float | None, ...] = ()
    step_dilation_runs: tuple[float | None, ...] = ()
    # each round's CPU seconds over wall seconds of its steps: a round that waited for a core
    # on a shared machine shows a lower share (None: the capture did not measure CPU time)
    cpu_share_runs: tuple[float | None, ...] = ()


@dataclass(frozen=True)
class ValidationResults:
    """validation.json: every configuration, the three comparisons, the noise floor, and what
    is missing."""

    engine: str
    workload: str
    cost_model: str  # a CostModelSpec's text
    configurations: tuple[ConfigResult, ...]
    forecast: Comparison  # at the reference speed
    probed: Comparison = Comparison()  # each run at its probed speed
    hindsight: Comparison = Comparison()  # each run at the speed its steps ran (no forecast)
    fit: FitSummary | None = None
    repeats: int = 1
    reference_probe_s: float | None = None
    noise: tuple[NoiseRow, ...] = ()
    forecast_inside_range: float | None = None  # fraction of judged configuration x metric
    kendall_tau_resolved: float | None = None  # over the pairs the rounds can order
    num_pairs_resolved: int = 0
    num_pairs: int = 0
    unordered_pairs: tuple[tuple[str, str], ...] = ()  # no ranking claim is made on these
    missing: tuple[Missing, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)  # the ValidationConfig, as run
    schema_version: int = VALIDATION_SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: Any, where: str = "validation results") -> ValidationResults:
        if not isinstance(doc, dict):
            raise ResultsError(f"{where}: expected a JSON object, got {type(doc).__name__}")
        version = doc.get("schema_version")
        if version != VALIDATION_SCHEMA_VERSION:
            raise ResultsError(
                f"{where}: validation results of schema version {version!r}; this testbed reads "
                f"version {VALIDATION_SCHEMA_VERSION} (rerun `eetb validate`)"
            )
        return _build(cls, doc, where)

    @classmethod
    def read(cls, path: str | Path) -> ValidationResults:
        return cls.from_json(read_object(path, ResultsError), str(path))


T = TypeVar("T")


def _build(cls: type[T], doc: Any, where: str) -> T:
    """A record from its JSON object, each field converted by its type hint."""
    if not isinstance(doc, dict):
        raise ResultsError(f"{where}: expected an object, got {type(doc).__name__}")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in doc:
            values[f.name] = _convert(hints[f.name], doc[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ResultsError(f"{where}: no field {f.name!r}")
    return cls(**values)


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None:
            return None
        return _convert(next(a for a in args if a is not type(None)), value, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ResultsError(f"{where}: expected a list, got {type(value).__name__}")
        items = args[:1] * len(value) if args[-1] is Ellipsis else args
        if len(items) != len(value):
            raise ResultsError(f"{where}: expected {len(items)} items, got {len(value)}")
        return tuple(
            _convert(h, v, f"{where}[{i}]")
            for i, (h, v) in enumerate(zip(items, value, strict=True))
        )
    return value  # numbers, strings, and the free-form mappings (metrics, policy, config)
