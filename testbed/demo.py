"""`eetb demo`: the whole loop on the built-in model, offline, in a few minutes on a laptop CPU.

calibrate (live runs of another request stream: the fitted cost model) → capture an oracle trace
→ simulate a grid of policies (sweep) → validate the top 3 and `full` on the native engine →
report. Each stage leaves its files under OUT and is skipped when rerun with the same OUT.
"""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from analysis.report import write_report
from testbed.core.policy_set import PolicyConfig
from testbed.datasets import load_summaries
from testbed.errors import DataError
from testbed.runinfo import to_jsonable, write_run_info
from testbed.sim.simulator import simulate
from testbed.sweep import Grid, PolicyGrid, run_sweep
from testbed.validate import (
    EngineRuns,
    ProgressFn,
    ValidationConfig,
    calibrate,
    oracle_trace,
    run_validation,
    select_from_sweep,
)


@dataclass(frozen=True)
class DemoConfig:
    # more than the 2-core reference machine serves (about 550 tokens/s at full depth): requests
    # queue, so throughput measures capacity and early exit can raise it
    workload: str = "poisson:rate=24,n=64,prompt=64-320,output=48"
    higher_load: str = "poisson:rate=48,n=64,prompt=64-320,output=48"  # simulated only
    # the workload's shape and size on another seed: an overloaded stream's queue (so its batch
    # sizes and contexts) grows with its length, and a fit prices only the range it has seen
    # (one demo's 48-request calibration never passed 12k context tokens a step; its 64-request
    # runs' steps beyond that took 1.25x the fit's price)
    calibration_workload: str = "poisson:rate=24,n=64,prompt=64-320,output=48"
    batching: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] = (
        ("consensus", ()),
        ("quorum", (("fraction", 0.75),)),
        ("shrink", ()),
        ("rebatch", ()),
    )
    # from "exits early, often wrong" to "rarely exits": mean exit layers of about 2.4 to 7 of 8
    rules: tuple[str, ...] = ("hidden", "classifier")
    thresholds: tuple[float, ...] = (0.95, 0.98, 0.99)
    min_exit_layer: int = 1
    min_agreement: float = 0.7  # the ranking's quality constraint (estimated agreement)
    top_k: int = 3
    spread: int = 2  # lower-ranked policies validated too: contrast for the rank test
    # validated policies at least 3% apart in simulated throughput (and from `full`): the
    # medians of three policies that scheduled alike spread 3.7% over one demo's rounds, and the
    # grid holds such twins (classifier@0.99 never exits under any batching policy)
    min_gap: float = 0.03
    repeats: int = 5  # validation rounds; measured = median (a shared machine is noisy)
    seed: int = 0
    model: str = "builtin"
    workers: int = 2


def choose_dataset(data_dir: str | None) -> str:
    """CNN/DM articles when the data directory has them, else text the model writes itself."""
    try:
        load_summaries("cnndm", "eval", data_dir)
    except DataError:
        return "self"
    return "cnndm"


def demo_grid(cfg: DemoConfig, trace: str, cost_model: str,
              kv_blocks: dict[str, int] | None = None) -> Grid:  # fmt: skip
    """The sweep of ``cfg``'s policies; ``kv_blocks`` (EngineRuns.kv_blocks): the validated
    engine's K/V capacity, so the sweep ranks what the engine will run."""
    policies = tuple(
        PolicyGrid(batching=name, rules=cfg.rules, thresholds=cfg.thresholds,
                   batching_params=params, min_exit_layer=cfg.min_exit_layer)
        for name, params in cfg.batching
    )  # fmt: skip
    workloads = tuple(w for w in (cfg.workload, cfg.higher_load) if w)  # "": one load only
    return Grid(trace=trace, workloads=workloads, cost_models=(cost_model,),
                policies=policies, seed=cfg.seed, min_agreement=cfg.min_agreement,
                **(kv_blocks or {}))  # fmt: skip


def demo_config(model: str = DemoConfig.model, **fields) -> DemoConfig:
    """The demo's configuration on ``model``: a known model's own grid (thresholds, first exit
    layer) unless ``fields`` give them."""
    from testbed.zoo.spec import KNOWN_MODELS

    given = {k: v for k, v in fields.items() if v is not None}
    spec = KNOWN_MODELS.get(model)
    if spec is not None and spec.demo_thresholds:
        given.setdefault("thresholds", spec.demo_thresholds)
        given.setdefault("min_exit_layer", spec.demo_min_exit_layer)
    return DemoConfig(model=model, **given)


def run_demo(
    cfg: DemoConfig, out: Path, *, data_dir: str | None, progress: ProgressFn | None = None
) -> Path:
    """Run every stage into out; return the report's path."""
    out = Path(out)
    dataset = choose_dataset(data_dir)
    write_run_info(out, cfg, seed=cfg.seed, dataset=dataset)
    # the calibration runs cover each exit rule of the grid, with a representative policy
    middle = cfg.thresholds[len(cfg.thresholds) // 2]
    representative = tuple(
        PolicyConfig(batching=cfg.batching[0][0], exit_rule=rule, threshold=middle,
                     min_exit_layer=cfg.min_exit_layer)
        for rule in cfg.rules
    )  # fmt: skip
    base = ValidationConfig(
        policies=representative, workload=cfg.workload,
        calibration_workload=cfg.calibration_workload, model=cfg.model, dataset=dataset,
        seed=cfg.seed, data_dir=data_dir, repeats=cfg.repeats,
    )  # fmt: skip
    engine = EngineRuns(base)
    # the sweep's cost model: these runs alone, so a resumed demo finds the same sweep keys
    cost_model = calibrate(engine, out / "validate", progress, pooled=False).cost_model
    trace = oracle_trace(engine, out / "validate", progress)
    grid = demo_grid(cfg, trace, cost_model, engine.kv_blocks)
    configs = [dataclasses.replace(c, data_dir=data_dir) for c in grid.expand()]
    write_run_info(out / "sweep", grid, seed=cfg.seed, num_runs=len(configs),
                   min_agreement=cfg.min_agreement)  # fmt: skip
    with ProcessPoolExecutor(max_workers=cfg.workers) as pool:
        report = run_sweep(
            configs, out / "sweep", executor=pool, run_fn=simulate, progress=progress
        )
    if report.failures:
        first = report.failures[0]
        raise DataError(
            f"{len(report.failures)} simulated runs failed, e.g. {first.label}: {first.message}"
        )
    selection = select_from_sweep(out / "sweep", cfg.top_k, workload=cfg.workload,
                                  spread=cfg.spread, min_gap=cfg.min_gap)  # fmt: skip
    # the validation adds calibration runs of the chosen policies to those the sweep used
    validation = dataclasses.replace(base, policies=selection.policies, trace=trace)
    (out / "selection.json").write_text(json.dumps(to_jsonable(selection), indent=1) + "\n")
    run_validation(validation, out / "validate", progress=progress, engine=engine)
    return write_report(out)
