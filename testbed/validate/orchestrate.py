"""The whole validation: calibration rounds, the oracle trace, every configuration's rounds
(round-robin), then the comparison."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from testbed.capture_records import covering_oracle, oracle_layers
from testbed.errors import EetbError
from testbed.runinfo import write_run_info
from testbed.sim.cost_model import build_cost_model
from testbed.trace import read_capture
from testbed.validate.compare_one import _validate_one
from testbed.validate.config import (
    BASELINE,
    ProgressFn,
    ValidationConfig,
    ValidationError,
    ValidationResult,
)
from testbed.validate.runs import EngineRuns, _is_finished, _is_finished_run_of, write_doc
from testbed.validate.speed import (
    Calibration,
    RunSpeed,
    dilation,
    fitted_at_reference,
    step_dilation,
)
from testbed.validate.summary import summarise, write_outputs


def calibrate(
    engine: EngineRuns, out: Path, progress: ProgressFn | None, *, round_index: int = 0,
    pooled: bool = True,
) -> Calibration:  # fmt: skip
    """The cost model: fitted on live runs of `full` and of every configuration on another
    request stream (another seed: never the validated runs themselves), pooled with every
    earlier calibration run under OUT/calibration. Each policy's mix of steps is then in the
    fit, which keeps per-row and per-exit-point costs apart. Live, not oracle: an oracle run
    also pays for recording every signal, which a served step does not. Runs round
    ``round_index`` of them; returns the cost model over all runs so far (``pooled``), or over
    this configuration list's runs alone (a spec that stays the same when rerun), fitted at the
    runs' median machine speed (fitted_at_reference)."""
    cfg = engine.cfg
    if cfg.calibration:
        dirs = cfg.calibration.split("+")
        for d in dirs:
            if not Path(d).is_dir():
                raise ValidationError(f"calibration run {d!r} is not a capture directory")
        calibration = fitted_at_reference(dirs)
        build_cost_model(calibration.cost_model)  # a bad calibration fails before any run
        return calibration
    reqs = None
    root = out / "calibration"
    for i, policy in enumerate(cfg.configurations):
        path = root / _slug(policy.label()) / f"r{round_index}"
        if progress is not None:
            progress(f"calibrate {round_index + 1}", i, len(cfg.configurations), policy.label())
        if _is_finished(path) or (path.parent / "refused").is_file():
            continue
        reqs = reqs or engine.calibration_requests(cfg.calibration_workload)
        try:
            engine.timed_capture(policy, "live", path, reqs)
        except EetbError as exc:
            if policy == BASELINE:
                raise
            shutil.rmtree(path, ignore_errors=True)  # the engine refuses it: validation says so
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.parent / "refused").write_text(f"{exc}\n")
    if pooled:
        dirs = sorted(str(m.parent) for m in root.rglob("meta.json") if _is_finished(m.parent))
    else:
        own = (root / _slug(p.label()) / f"r{k}" for p in cfg.configurations
               for k in range(round_index + 1))  # fmt: skip
        dirs = sorted(str(d) for d in own if _is_finished(d))
    return fitted_at_reference(dirs)


def _slug(label: str) -> str:
    """A folder name for a policy label ('+' separates the fitted model's captures)."""
    return re.sub(r"[^\w.@=()≥-]", "_", label)


def oracle_trace(engine: EngineRuns, out: Path, progress: ProgressFn | None) -> str:
    if engine.cfg.trace:
        cap = read_capture(engine.cfg.trace)
        if cap.meta.get("mode") != "oracle":
            raise ValidationError(
                f"{engine.cfg.trace}: the simulator replays an oracle trace, this one is {cap.meta.get('mode')!r}"
            )
        return engine.cfg.trace
    path = out / "oracle"
    # only the configurations' exit points: each one costs the oracle an LM head per token
    points = covering_oracle(engine.cfg.configurations)
    needed = set(oracle_layers(points, engine.ckpt.config.num_hidden_layers))
    if not (path / "meta.json").is_file() or not needed <= set(
        read_capture(path).oracle_layers or ()
    ):
        if progress is not None:
            progress("oracle", 0, 1, "capturing the oracle trace")
        engine.capture(points, "oracle", path)
    return str(path)


def _references(cfg: ValidationConfig, engine: EngineRuns) -> dict[int, str] | None:
    from testbed.datasets import load_summaries

    if all(r.source_index is None for r in engine.requests):
        return None
    examples = load_summaries(cfg.dataset, "eval", cfg.data_dir)
    return {r.request_id: examples[r.source_index].reference for r in engine.requests
            if r.source_index is not None}  # fmt: skip


def run_validation(
    cfg: ValidationConfig, out: Path, *, progress: ProgressFn | None = None,
    engine: EngineRuns | None = None,
) -> ValidationResult:  # fmt: skip
    """Run every configuration `repeats` times, round-robin; one the engine cannot run is
    recorded and the others go on. Rerunning with the same OUT reuses every finished run.
    ``engine``: one already loaded for the same model, workload, dataset and seed (the demo's)."""
    out = Path(out)
    configs = cfg.configurations
    for i, policy in enumerate(configs):  # before anything is run or overwritten
        for k in range(cfg.repeats):
            _is_finished_run_of(out / "live" / f"{i:02d}" / f"r{k}", policy)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    write_run_info(out, cfg, seed=cfg.seed)
    engine = EngineRuns(cfg) if engine is None else engine.with_config(cfg)
    oracle = oracle_trace(engine, out, progress)
    references = _references(cfg, engine)
    failed: dict[int, dict[str, Any]] = {}
    calibration = Calibration("", None)
    for k in range(cfg.repeats):
        calibration = calibrate(engine, out, progress, round_index=k)
        for i, policy in enumerate(configs):
            path = out / "live" / f"{i:02d}" / f"r{k}"
            if i in failed or _is_finished(path):  # of this policy: checked above
                continue
            if progress is not None:
                progress(f"validate {k + 1}/{cfg.repeats}", i, len(configs), policy.label())
            try:
                engine.timed_capture(policy, "live", path)
            except EetbError as exc:  # this configuration cannot run: record it, go on
                shutil.rmtree(path, ignore_errors=True)
                failed[i] = {"index": i, "label": policy.label(),
                             "message": f"{type(exc).__name__}: {exc}"}  # fmt: skip
                write_doc(out / "configs" / f"{i:02d}.error.json", failed[i])
    cost_model = calibration.cost_model
    fit = build_cost_model(cost_model)
    done: list[dict[str, Any]] = []
    full_outputs = None
    for i, policy in enumerate(configs):
        if i in failed:
            continue
        runs = [out / "live" / f"{i:02d}" / f"r{k}" for k in range(cfg.repeats)]
        lives = [read_capture(run) for run in runs]
        speeds = [RunSpeed(dilation(run, calibration), step_dilation(run, fit)) for run in runs]
        doc = _validate_one(i, policy, engine, oracle, cost_model, lives, speeds,
                            full_outputs, references)  # fmt: skip
        if i == 0:
            full_outputs = doc["outputs"]
        write_doc(out / "configs" / f"{i:02d}.json", doc)
        (out / "configs" / f"{i:02d}.error.json").unlink(missing_ok=True)
        done.append(doc)
    if progress is not None:
        progress("validate", len(configs), len(configs), "compared with the simulator")
    results = summarise(cfg, done, list(failed.values()), calibration, getattr(fit, "report", None))
    write_outputs(out, results, done)
    return ValidationResult(out, results)
