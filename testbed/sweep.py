"""Sweeps: a grid of policies × rules × λ × workloads × cost models, run on any Executor.

GRID.toml (paths are relative to the working directory of the sweep and of its workers):

    trace = "traces/samples/oracle_cnndm"      # capture directory to replay
    workloads = ["poisson:rate=2,n=200,prompt=64-384,output=64"]   # one or more
    cost_models = ["roofline:H100", "fitted:traces/samples/oracle_cnndm"]
    seed = 0                                    # optional (0)
    block_size = 16                             # optional, as SimulationConfig
    num_kv_blocks = 4096                        # optional, as SimulationConfig

    [[policies]]                 # one or more; each expands over rules × thresholds
    batching = "consensus"       # registry name
    batching_params = {}         # optional, e.g. {fraction = 0.75}
    rules = ["hidden", "softmax"]
    thresholds = [0.9, 0.95]
    min_exit_layer = 1           # optional; also exit_stride (1), kv_fill ("copy"), decay_tau

    [constraint]                 # optional
    min_agreement = 0.9          # the ranking keeps runs with est_agreement >= this

    [scheduler]                  # optional SchedulerConfig fields
    max_num_seqs = 64

Every workload × cost model also runs the `full` policy, the baseline that speedups refer to.
Each finished run is written at once to OUT/runs/<key>.json (key: a hash of the run's config), so an
interrupted sweep resumes where it stopped; a failed run leaves OUT/runs/<key>.error.json and the
sweep goes on. OUT/results.parquet then holds one row per finished run: config columns and metrics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import signal
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from policies.errors import PolicyConfigError
from testbed import atomic
from testbed.core.admission import SchedulerConfig
from testbed.core.errors import CoreError
from testbed.core.policy_set import PolicyConfig
from testbed.errors import ConfigError, EetbError
from testbed.locks import LOCK_FILE, exclusive
from testbed.runinfo import to_jsonable
from testbed.sim.simulator import SimulationConfig, SimulationResult, simulate
from testbed.workload.spec import parse_workload

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

log = logging.getLogger(__name__)

RUN_SCHEMA_VERSION = 1
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


# --- reading GRID.toml --------------------------------------------------------------------------

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


# --- running ------------------------------------------------------------------------------------

RunFn = Callable[[SimulationConfig], SimulationResult]


@dataclass(frozen=True)
class RunFailure:
    key: str
    label: str  # workload · cost model · policy
    message: str  # "ExceptionType: text"


@dataclass(frozen=True)
class SweepReport:
    num_runs: int
    num_skipped: int  # finished by an earlier, interrupted sweep of the same configs
    num_finished: int  # finished by this call
    failures: tuple[RunFailure, ...]
    rows: tuple[dict[str, Any], ...]  # one per finished run, as in results.parquet
    results_path: Path | None  # None when no run has finished


def run_key(cfg: SimulationConfig) -> str:
    """First 16 hex digits of the sha256 of the config's canonical JSON."""
    text = json.dumps(to_jsonable(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_label(cfg: SimulationConfig) -> str:
    return f"{cfg.workload} · {cfg.cost_model} · {cfg.policy.label()}"


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    atomic.write_json(path, doc)  # a sweep killed mid-write leaves no point that looks finished


def _record_run(runs_dir: Path, key: str, cfg: SimulationConfig, result: SimulationResult) -> None:
    doc = {"schema_version": RUN_SCHEMA_VERSION, "key": key, "config": to_jsonable(cfg),
           "metrics": result.metrics.to_dict(),
           "num_requests_clipped": result.clip.num_requests_clipped}  # fmt: skip
    _write_json(runs_dir / f"{key}.json", doc)
    (runs_dir / f"{key}.error.json").unlink(missing_ok=True)  # an earlier try's failure


def _record_failure(
    runs_dir: Path, key: str, cfg: SimulationConfig, exc: BaseException
) -> RunFailure:
    failure = RunFailure(key, run_label(cfg), f"{type(exc).__name__}: {exc}")
    log.warning("run %s (%s) failed: %s", key, failure.label, failure.message)
    doc = {"key": key, "config": to_jsonable(cfg), "message": failure.message,
           "traceback": traceback.format_exception(type(exc), exc, exc.__traceback__)}  # fmt: skip
    _write_json(runs_dir / f"{key}.error.json", doc)
    return failure


def _execute(
    pending: dict[str, SimulationConfig], runs_dir: Path, executor: Executor, run_fn: RunFn,
    progress: ProgressFn | None,
) -> list[RunFailure]:  # fmt: skip
    futures = {executor.submit(run_fn, cfg): key for key, cfg in pending.items()}
    failures: list[RunFailure] = []
    for done, future in enumerate(as_completed(futures), start=1):
        key = futures[future]
        try:  # any error of one run is that run's failure, never the sweep's
            _record_run(runs_dir, key, pending[key], future.result())
        except Exception as exc:
            failures.append(_record_failure(runs_dir, key, pending[key], exc))
        if progress is not None:
            progress("sweep", done, len(futures), f"{len(failures)} failed" if failures else "")
    return failures


def run_sweep(
    configs: Sequence[SimulationConfig], out_dir: Path, *, executor: Executor,
    run_fn: RunFn = simulate, progress: ProgressFn | None = None,
    on_locked: Callable[[], None] | None = None,
) -> SweepReport:  # fmt: skip
    """Run every config not finished under out_dir yet, then write out_dir/results.parquet.
    One sweep per folder: a second refuses (GridError). ``on_locked`` runs once the folder is
    this sweep's (the caller's run.json goes there, never over a running sweep's)."""
    runs_dir = Path(out_dir) / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    refusal = lambda: GridError(  # noqa: E731
        f"another sweep is writing {out_dir}; wait for it or choose another --out"
    )
    with exclusive(Path(out_dir) / LOCK_FILE, refusal):
        if on_locked is not None:
            on_locked()
        return _sweep_locked(configs, Path(out_dir), runs_dir, executor, run_fn, progress)


def _sweep_locked(
    configs: Sequence[SimulationConfig], out_dir: Path, runs_dir: Path, executor: Executor,
    run_fn: RunFn, progress: ProgressFn | None,
) -> SweepReport:  # fmt: skip
    keyed = {run_key(cfg): cfg for cfg in configs}
    pending = {k: c for k, c in keyed.items() if _finished_metrics(runs_dir / f"{k}.json") is None}
    log.info("%d runs, %d finished before, %d to run", len(keyed), len(keyed) - len(pending),
             len(pending))  # fmt: skip
    if progress is not None:
        progress("sweep", 0, len(pending), f"{len(keyed) - len(pending)} finished before")
    failures = _execute(pending, runs_dir, executor, run_fn, progress)
    rows = collect_rows(runs_dir, keyed)
    return SweepReport(
        num_runs=len(keyed),
        num_skipped=len(keyed) - len(pending),
        num_finished=len(pending) - len(failures),
        failures=tuple(failures),
        rows=tuple(rows),
        results_path=write_results(rows, out_dir / "results.parquet") if rows else None,
    )


@contextmanager
def open_executor(dask: str | None, num_workers: int) -> Iterator[Executor]:
    """A local process pool, or a Dask cluster's executor: an address, or 'local' (embedded)."""
    if dask is None:
        # workers ignore Ctrl-C: the parent decides, keeps the finished points and stops them
        pool = ProcessPoolExecutor(max_workers=num_workers, initializer=_ignore_sigint)
        try:
            yield pool
        except BaseException:  # Ctrl-C or an error: stop now, not after the running points
            _stop_workers(pool)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return
    with _dask_client(dask, num_workers) as client:
        yield client.get_executor()


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Terminate the pool's processes: their points are unfinished and redone on resume.
    ProcessPoolExecutor has no public way before Python 3.14 (terminate_workers)."""
    processes = getattr(pool, "_processes", None) or {}
    for process in list(processes.values()):
        process.terminate()


@contextmanager
def _dask_client(address: str, num_workers: int) -> Iterator[Any]:
    try:  # optional dependency (the `dask` extra): imported only when asked for
        import distributed
    except ImportError:
        raise ConfigError("--dask needs dask.distributed: pip install 'eetb[dask]'") from None
    if address == "local":
        with (
            distributed.LocalCluster(n_workers=num_workers, threads_per_worker=1, processes=True,
                                     dashboard_address=None) as cluster,
            distributed.Client(cluster) as client,
        ):  # fmt: skip
            yield client
        return
    try:
        client = distributed.Client(address)
    except (OSError, ValueError) as exc:  # unreachable, or not an address
        raise ConfigError(f"--dask {address}: {exc}") from None
    with client:
        yield client


# --- results ------------------------------------------------------------------------------------


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


def _finished_metrics(path: Path, *, quiet: bool = False) -> dict[str, Any] | None:
    """A finished point's metrics; None when it has not run or its file is torn (a disk full, a
    copy cut short): that point is run again, with a line saying so."""
    try:
        metrics = json.loads(path.read_text())["metrics"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if not quiet:
            print(f"eetb: {path.name} is unreadable ({type(exc).__name__}); running that point "
                  "again", file=sys.stderr)  # fmt: skip
        return None
    return metrics if isinstance(metrics, dict) else None


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
