"""Running a grid's simulations on any Executor (a local process pool or a Dask cluster),
one file per finished run, resumable, one writer per folder."""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed import atomic
from testbed.errors import ConfigError
from testbed.locks import LOCK_FILE, exclusive
from testbed.runinfo import to_jsonable
from testbed.sim.simulator import SimulationConfig, SimulationResult, simulate
from testbed.sweep.grid import RUN_SCHEMA_VERSION, GridError, ProgressFn, RunFn
from testbed.sweep.results import _finished_metrics, as_run, collect_rows, write_results

log = logging.getLogger(__name__)


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
           "metrics": result.metrics.to_dict(), "as_run": as_run(result.config),
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
