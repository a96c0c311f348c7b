"""GRID.toml parsed and checked into a Grid (the format is in testbed.sweep's docstring)."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policies.errors import PolicyConfigError
from testbed.core.admission import SchedulerConfig
from testbed.core.errors import CoreError
from testbed.core.policy_set import PolicyConfig
from testbed.errors import EetbError
from testbed.sim.simulator import SimulationConfig, SimulationResult
from testbed.workload.spec import parse_workload

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


# 2: a run's file holds as_run, the capacity and context simulate() resolved (a fitted point
# of version 1 may have run at the 4096-block default instead of its engine's own: run again)
RUN_SCHEMA_VERSION = 2


BASELINE_POLICY = PolicyConfig(batching="full")


ProgressFn = Callable[[str, int, int, str], None]  # (phase, done, total, note): ProgressLine


class GridError(EetbError):
    """A sweep grid file is missing, malformed, or holds a bad value."""


@dataclass(frozen=True)
class PolicyGrid:
    """One [[policies]] entry: a batching policy swept over exit rules × thresholds."""

    batching: str
    rules: tuple[str, ...]
    thresholds: tuple[float, ...]
    batching_params: tuple[tuple[str, Any], ...] = ()  # sorted by name
    min_exit_layer: int = 1
    exit_stride: int = 1
    kv_fill: str = "copy"
    decay_tau: float | None = None

    def expand(self) -> list[PolicyConfig]:
        if self.batching == BASELINE_POLICY.batching:  # no exit: rule and λ change nothing
            return [BASELINE_POLICY]
        fixed = dataclasses.asdict(self)
        for name in ("rules", "thresholds"):
            del fixed[name]
        return [
            PolicyConfig(**fixed, exit_rule=rule, threshold=threshold)
            for rule in self.rules
            for threshold in self.thresholds
        ]


@dataclass(frozen=True)
class Grid:
    trace: str  # capture directory to replay
    workloads: tuple[str, ...]
    cost_models: tuple[str, ...]
    policies: tuple[PolicyGrid, ...]
    seed: int = 0
    min_agreement: float | None = None  # [constraint]; None: rank every run
    scheduler: SchedulerConfig = SchedulerConfig()
    block_size: int | None = None  # None: SimulationConfig's default
    num_kv_blocks: int | None = None

    def expand(self) -> list[SimulationConfig]:
        """Every run: workloads × cost models × (the baseline + each policy entry's grid)."""
        policies = _unique([BASELINE_POLICY, *(p for g in self.policies for p in g.expand())])
        sizes = {"block_size": self.block_size, "num_kv_blocks": self.num_kv_blocks}
        extra = {name: value for name, value in sizes.items() if value is not None}
        return [
            SimulationConfig(
                trace=self.trace,
                workload=workload,
                policy=policy,
                cost_model=cost_model,
                scheduler=self.scheduler,
                seed=self.seed,
                **extra,
            )
            for workload in self.workloads
            for cost_model in self.cost_models
            for policy in policies
        ]


def _unique(items: Iterable[PolicyConfig]) -> list[PolicyConfig]:
    return list(dict.fromkeys(items))


TOP_KEYS = ("trace", "workloads", "cost_models", "seed", "block_size", "num_kv_blocks",
            "policies", "constraint", "scheduler")  # fmt: skip


POLICY_KEYS = ("batching", "batching_params", "rules", "thresholds", "min_exit_layer",
               "exit_stride", "kv_fill", "decay_tau")  # fmt: skip


CONSTRAINT_KEYS = ("min_agreement",)


# every SchedulerConfig field has a default, whose type is the field's
SCHEDULER_TYPES = {f.name: type(f.default) for f in dataclasses.fields(SchedulerConfig)}


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list", dict: "a table"}  # fmt: skip


@dataclass(frozen=True)
class _Table:
    """A TOML table being read: typed access; errors name the file and the key's path."""

    values: dict[str, Any]
    source: str  # the grid file
    path: str = ""  # where the table sits, e.g. "policies[1]."

    def error(self, text: str) -> GridError:
        return GridError(f"{self.source}: {text}")

    def check_keys(self, allowed: Sequence[str]) -> None:
        for key in self.values:
            if key not in allowed:
                place = f" in {self.path.rstrip('.')}" if self.path else ""
                raise self.error(f"unknown key {key!r}{place} (allowed: {', '.join(allowed)})")

    def typed(self, value: Any, kind: type, name: str) -> Any:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            got = f"{type(value).__name__} {value!r}"
            raise self.error(f"{self.path}{name} must be {_TYPE_NAMES[kind]}, got {got}")
        return value

    def optional(self, key: str, kind: type, default: Any) -> Any:
        return self.typed(self.values[key], kind, key) if key in self.values else default

    def required(self, key: str, kind: type) -> Any:
        if key not in self.values:
            raise self.error(f"missing key {self.path}{key}")
        return self.typed(self.values[key], kind, key)

    def list_of(self, key: str, kind: type) -> tuple[Any, ...]:
        items = self.required(key, list)
        if not items:
            raise self.error(f"{self.path}{key} is an empty list")
        return tuple(self.typed(v, kind, f"{key}[{i}]") for i, v in enumerate(items))

    def table(self, key: str, value: Any = None) -> _Table:
        """The sub-table `key` (empty when absent), or `value` read as one named `key`."""
        raw = self.optional(key, dict, {}) if value is None else self.typed(value, dict, key)
        return _Table(raw, self.source, f"{self.path}{key}.")


def _params(t: _Table, key: str) -> tuple[tuple[str, Any], ...]:
    params = t.table(key)
    for name, value in params.values.items():  # scalars only: configs must stay hashable
        if not isinstance(value, int | float | str | bool):
            raise t.error(f"{params.path}{name} must be a number, string or boolean")
    return tuple(sorted(params.values.items()))


def _policy_grid(t: _Table) -> PolicyGrid:
    t.check_keys(POLICY_KEYS)
    grid = PolicyGrid(
        batching=t.required("batching", str),
        rules=t.list_of("rules", str),
        thresholds=t.list_of("thresholds", float),
        batching_params=_params(t, "batching_params"),
        min_exit_layer=t.optional("min_exit_layer", int, 1),
        exit_stride=t.optional("exit_stride", int, 1),
        kv_fill=t.optional("kv_fill", str, "copy"),
        decay_tau=t.optional("decay_tau", float, None),
    )
    try:  # each PolicyConfig checks itself: unknown names and bad values fail here, not in runs
        grid.expand()
    except PolicyConfigError as exc:
        raise t.error(f"{t.path.rstrip('.')}: {exc}") from None
    return grid


def _scheduler(t: _Table) -> SchedulerConfig:
    t.check_keys(tuple(SCHEDULER_TYPES))
    values = {key: t.typed(v, SCHEDULER_TYPES[key], key) for key, v in t.values.items()}
    try:
        return SchedulerConfig(**values)
    except CoreError as exc:
        raise t.error(f"scheduler: {exc}") from None


def _check_values(t: _Table, grid: Grid) -> None:
    """What the types allow but no run could use; caught once here rather than in every run."""
    for i, workload in enumerate(grid.workloads):
        try:
            parse_workload(workload)
        except EetbError as exc:
            raise t.error(f"workloads[{i}]: {exc}") from None
    if grid.seed < 0:
        raise t.error(f"seed must be >= 0, got {grid.seed}")
    if grid.min_agreement is not None and not 0 <= grid.min_agreement <= 1:
        raise t.error(f"constraint.min_agreement must be in [0, 1], got {grid.min_agreement}")
    for name in ("block_size", "num_kv_blocks"):
        if getattr(grid, name) is not None and getattr(grid, name) <= 0:
            raise t.error(f"{name} must be > 0, got {getattr(grid, name)}")


def parse_grid(doc: dict[str, Any], source: str) -> Grid:
    """Validate a parsed GRID.toml; errors name the source and the offending key."""
    top = _Table(doc, source)
    top.check_keys(TOP_KEYS)
    constraint = top.table("constraint")
    constraint.check_keys(CONSTRAINT_KEYS)
    entries = top.list_of("policies", dict)
    policies = tuple(_policy_grid(top.table(f"policies[{i}]", e)) for i, e in enumerate(entries))
    grid = Grid(
        trace=top.required("trace", str),
        workloads=top.list_of("workloads", str),
        cost_models=top.list_of("cost_models", str),
        policies=policies,
        seed=top.optional("seed", int, 0),
        min_agreement=constraint.optional("min_agreement", float, None),
        scheduler=_scheduler(top.table("scheduler")),
        block_size=top.optional("block_size", int, None),
        num_kv_blocks=top.optional("num_kv_blocks", int, None),
    )
    _check_values(top, grid)
    return grid


def load_grid(path: str | Path) -> Grid:
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise GridError(f"cannot read grid {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise GridError(f"{path}: not valid TOML ({exc})") from None
    return parse_grid(doc, str(path))


RunFn = Callable[[SimulationConfig], SimulationResult]
