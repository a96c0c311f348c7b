"""``--suite noise``: how repeatable one `full` measurement is on this machine, and what lowers
its run-to-run spread. The same arrival-paced workload runs in interleaved rounds under a few
variants (as validation runs it; one torch thread; a warm-up burst before each run), and each
variant's spread of wall throughput is printed beside the spread of its CPU seconds per token.

Wall throughput moves with everything else the machine runs; CPU seconds per token move only
with the work and the cache and memory contention, so the gap between the two spreads is what a
shared machine adds.

Measured here (built-in model, the demo's load, 10 rounds, twice): MAD/median of throughput cold
6.1% and 4.2%, after a warm-up 2.4% and 4.0%, on one thread 1.9% and 3.0% at 0.75x the
throughput. The CPU share stayed 1.99 of 2 cores and CPU s/token spread as much as wall time:
the engine never waited for a core; the cores themselves ran at varying speed. Validation keeps
its two threads and no warm-up (neither gain held from one session to the next), and judges
the simulator in hindsight, each run at the speed its own steps ran."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch

from testbed.bench.options import BenchOptions, Progress, Say
from testbed.demo import DemoConfig
from testbed.errors import ConfigError
from testbed.runinfo import to_jsonable, write_run_info

WARM_UP_REQUESTS = 8  # the burst before each timed run of a warm-up variant


@dataclass(frozen=True)
class NoiseRun:
    variant: str
    round: int
    throughput_tokens_per_s: float
    cpu_s_per_token: float | None
    cpu_share: float | None  # CPU seconds over wall seconds of the steps


@dataclass(frozen=True)
class Spread:
    """One variant's rounds of one metric: relative MAD (median absolute deviation over the
    median) and range (max - min over the median)."""

    median: float
    mad: float
    range: float

    @staticmethod
    def of(values: list[float]) -> Spread:
        x = np.asarray(values, dtype=float)
        med = float(np.median(x))
        mad = float(np.median(np.abs(x - med)))
        return Spread(
            med, mad / med if med else 0.0, float(x.max() - x.min()) / med if med else 0.0
        )


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to n for the block (None: as they are); restored after."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Variant:
    name: str
    threads: int | None = None  # None: torch's default
    warm_up: bool = False


VARIANTS = (Variant("cold"), Variant("warm-up", warm_up=True), Variant("1 thread", threads=1),
            Variant("1 thread, warm", threads=1, warm_up=True))  # fmt: skip


def _warm_up(runs, scratch: Path) -> None:
    """The workload's first WARM_UP_REQUESTS requests all at once, into ``scratch`` (removed)."""
    from testbed.validate import BASELINE

    burst = [replace(r, arrival_s=0.0) for r in runs.requests[:WARM_UP_REQUESTS]]
    try:
        runs.capture(BASELINE, "live", scratch, burst)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _measure(runs, variant: Variant, out: Path) -> tuple[float, float | None, float | None]:
    """One timed `full` capture of the workload: (tokens/s, CPU s per token, CPU share)."""
    from testbed.sim.metrics import compute_metrics
    from testbed.trace import read_capture
    from testbed.validate import BASELINE
    from testbed.validate.measured import live_records
    from testbed.validate.speed import cpu_share

    with _threads(variant.threads):
        if variant.warm_up:
            _warm_up(runs, out.with_name(f"{out.name}.warm"))
        cap = read_capture(runs.capture(BASELINE, "live", out))
    metrics = compute_metrics(live_records(cap), [])
    cpu = cap.steps["cpu_s"]
    per_token = None
    if cpu.null_count == 0 and metrics.num_output_tokens:
        per_token = float(pc.sum(cpu).as_py()) / metrics.num_output_tokens
    return metrics.throughput_tokens_per_s, per_token, cpu_share(cap)


def run(
    opts: BenchOptions,
    say: Say = print,
    progress: Progress | None = None,
    variants: tuple[Variant, ...] = VARIANTS,
) -> dict[str, dict[str, Spread]]:
    """``opts.rounds`` interleaved rounds of every variant (round-robin, so a slow minute of the
    machine falls on all of them); per variant, the spread of throughput and CPU s/token."""
    from testbed.validate import BASELINE, EngineRuns, ValidationConfig

    workload, rounds = opts.workload or DemoConfig.workload, opts.rounds
    if rounds < 2:
        raise ConfigError(f"--rounds must be at least 2 to measure a spread, got {rounds}")
    cfg = ValidationConfig(policies=(BASELINE,), workload=workload, calibration_workload=workload,
                           model=opts.model, dataset=opts.dataset, data_dir=opts.data_dir,
                           device=opts.device,
                           dtype=opts.dtype)  # fmt: skip
    engine = EngineRuns(cfg)
    write_run_info(opts.out, {"workload": workload, "rounds": rounds, "model": opts.model,
                              "variants": to_jsonable(variants)}, seed=cfg.seed, suite="noise")  # fmt: skip
    tick: Callable[[str, int, int, str], None] = progress or (lambda *a: None)
    results: list[NoiseRun] = []
    total = rounds * len(variants)
    for k in range(rounds):
        for v in variants:
            tick("noise", len(results), total, f"round {k + 1}, {v.name}")
            tput, per_token, share = _measure(engine, v, opts.out / "runs" / f"r{k}-{len(results)}")
            results.append(NoiseRun(v.name, k, tput, per_token, share))
    tick("noise", total, total, "")
    (opts.out / "noise.json").write_text(json.dumps(to_jsonable(results), indent=2) + "\n")
    return _report(results, variants, workload, say)


def _report(results: list[NoiseRun], variants, workload: str, say: Say):
    say(f"`full` on {workload}, {max(r.round for r in results) + 1} interleaved rounds")
    say(f"{'variant':14s} {'tok/s':>8s} {'MAD/med':>8s} {'range':>7s} "
        f"{'CPU ms/tok':>10s} {'MAD/med':>8s} {'range':>7s} {'CPU share':>9s}")  # fmt: skip
    spreads = {}
    for v in variants:
        mine = [r for r in results if r.variant == v.name]
        tput = Spread.of([r.throughput_tokens_per_s for r in mine])
        row = {"throughput": tput}
        line = f"{v.name:14s} {tput.median:8.1f} {tput.mad:8.1%} {tput.range:7.1%} "
        if all(r.cpu_s_per_token is not None for r in mine):
            cpu = Spread.of([1e3 * r.cpu_s_per_token for r in mine])
            share = float(np.median([r.cpu_share for r in mine]))
            row["cpu_per_token"] = cpu
            line += f"{cpu.median:10.2f} {cpu.mad:8.1%} {cpu.range:7.1%} {share:9.2f}"
        say(line)
        spreads[v.name] = row
    say("range: (max - min) / median over the rounds; CPU share: CPU s over wall s of the steps")
    return spreads
