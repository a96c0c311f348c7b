"""``eetb sweep GRID.toml``: simulate a grid of policies, write results.parquet and a ranking.

The grid format is in ``testbed.sweep``'s docstring. Runs go to a local process pool, or to a Dask
cluster with ``--dask ADDRESS`` (``--dask local`` starts one in-process). Rerunning the same
command after an interruption resumes: finished runs are kept and skipped.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from testbed.commands.common import ProgressLine, add_data_dir, guarded, parser
from testbed.core.policy_set import PolicyConfig, build_policies
from testbed.errors import ConfigError
from testbed.runinfo import write_run_info
from testbed.sim.errors import SimulationError
from testbed.sim.simulator import simulate
from testbed.sim.token_source import check_exit_points
from testbed.sweep import SweepReport, load_grid, open_executor, rank_runs, run_sweep
from testbed.trace import read_capture

EXIT_RUNS_FAILED = 1  # some runs failed; the others' results are written


def _args(argv: list[str]):
    p = parser("sweep", "Simulate a grid of policies × rules × λ × workloads × cost models.")
    p.add_argument("grid", type=Path, help="GRID.toml (format: python -m pydoc testbed.sweep)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: runs/sweep-<grid name>); rerun to resume")  # fmt: skip
    p.add_argument("--dask", default=None, metavar="ADDRESS|local",
                   help="run on a Dask scheduler at ADDRESS, or on an embedded local cluster")  # fmt: skip
    p.add_argument("--workers", type=int, default=2,
                   help="local worker processes (also the size of --dask local)")  # fmt: skip
    p.add_argument("--min-agreement", type=float, default=None,
                   help="rank only runs with est. agreement >= this (overrides [constraint])")  # fmt: skip
    add_data_dir(p)
    args = p.parse_args(argv)
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    return args


@guarded
def main(argv: list[str]) -> int:
    args = _args(argv)
    grid = load_grid(args.grid)
    min_agreement = grid.min_agreement if args.min_agreement is None else args.min_agreement
    configs = grid.expand()
    if args.data_dir is not None:
        configs = [dataclasses.replace(c, data_dir=args.data_dir) for c in configs]
    if args.dask in (None, "local"):  # a remote scheduler's workers may see other files
        _check_trace(args.grid, grid.trace, [c.policy for c in configs])
    out = args.out or Path("runs") / f"sweep-{args.grid.stem}"

    def run_info() -> None:
        write_run_info(out, grid, seed=grid.seed, grid_file=str(args.grid), num_runs=len(configs),
                       min_agreement=min_agreement, dask=args.dask, workers=args.workers)  # fmt: skip

    with open_executor(args.dask, args.workers) as executor:
        report = run_sweep(configs, out, executor=executor, run_fn=simulate,
                           progress=ProgressLine(), on_locked=run_info)  # fmt: skip
    text = ranking_markdown(rank_runs(report.rows, min_agreement), min_agreement, len(report.rows))
    (out / "ranking.md").write_text(text)
    print(text)
    print(f"{_summary(report)}; wrote {out}")
    for failure in report.failures:
        print(
            f"eetb: run {failure.key} failed ({failure.label}): {failure.message}", file=sys.stderr
        )
    return EXIT_RUNS_FAILED if report.failures else 0


def _check_trace(grid_file: Path, trace: str, policies: list[PolicyConfig]) -> None:
    """Refuse, before any run, a grid that its trace cannot replay: no such folder, or exit
    points an oracle did not record (each run would fail on its own otherwise)."""
    if not Path(trace).is_dir():
        raise ConfigError(f"{grid_file}: trace {trace!r} is not a directory")
    if not (Path(trace) / "meta.json").is_file():
        return  # not a capture: each run fails on it with the reader's own message
    capture = read_capture(trace)
    for policy in dict.fromkeys(p for p in policies if p.is_early_exit):
        try:
            check_exit_points(capture, build_policies(policy).exit_points)
        except SimulationError as exc:
            raise ConfigError(f"{grid_file}: {policy.label()}: {exc}") from None


def _summary(report: SweepReport) -> str:
    return (
        f"{report.num_runs} runs: {report.num_finished} finished now, {report.num_skipped} "
        f"skipped (finished before), {len(report.failures)} failed"
    )


COLUMNS = ("rank", "policy", "tokens/s", "speedup", "agreement", "mean exit layer",
           "TTFT p99 ms", "TPOT p50 ms", "preemptions")  # fmt: skip


def _cells(rank: int, r: dict[str, Any]) -> list[str]:
    def opt(value: float | None, fmt: str, scale: float = 1.0) -> str:
        return "-" if value is None else format(scale * value, fmt)

    return [
        str(rank), r["policy"], f"{r['throughput_tokens_per_s']:.1f}", opt(r["speedup"], ".2f"),
        opt(r["est_agreement"], ".1%"), f"{r['mean_exit_layer']:.2f}",
        f"{1e3 * r['ttft_p99_s']:.4g}", opt(r["tpot_p50_s"], ".4g", 1e3),
        str(r["num_preemptions"]),
    ]  # fmt: skip


def ranking_markdown(
    ranked: Sequence[dict[str, Any]], min_agreement: float | None, num_finished: int
) -> str:
    """Markdown: one table per workload × cost model, best throughput first."""
    constraint = (
        "no quality constraint" if min_agreement is None
        else f"estimated agreement >= {min_agreement:.1%}"
    )  # fmt: skip
    lines = [
        "# Sweep ranking", "",
        f"{len(ranked)} of {num_finished} finished runs meet the constraint ({constraint}); "
        "speedup is throughput over the `full` run of the same workload and cost model.",
    ]  # fmt: skip
    for (workload, cost_model), rows in itertools.groupby(
        ranked, key=lambda r: (r["workload"], r["cost_model"])
    ):
        lines += ["", f"## {workload} · {cost_model}", "", "| " + " | ".join(COLUMNS) + " |"]
        lines.append("|" + "|".join("---:" if c != "policy" else "---" for c in COLUMNS) + "|")
        lines += ["| " + " | ".join(_cells(i, r)) + " |" for i, r in enumerate(rows, start=1)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
