"""A/B validation: run chosen policies on a real engine and the simulator, compare the two.

For each configuration (the `full` baseline first) the engine runs the workload arrival-paced
as a live capture; the simulator replays the workload's oracle trace with a cost model fitted on
a *separate* calibration run. The result folder holds, per configuration, the measured and the
predicted metrics, quality (ROUGE-L, agreement with `full`'s output) and the replay error (how
the exit layers the simulator derived from the oracle trace differ from what the live run did),
plus a table of errors and the Kendall tau of the two throughput orders.

A shared machine's speed wanders by tens of percent between runs. A short fixed probe
(speed_probe) is timed three times right before and three times right after every calibration
and measured run. The fit normalises each calibration run to the calibration's median probe
time (the reference speed); the prediction is made at that speed. Beside it, each measured run
is also predicted at its own probe time
(``F*fitted:...``, "probed"); the run's own timings never enter either prediction.

A third prediction is made in hindsight: each measured run at the speed its own steps ran
(their seconds over the fit's price of them, known only after the run). It is no forecast, but
it splits an error in two: what remains at the run's own speed is the simulator's (replay,
scheduling, queue); the rest is the machine's speed that neither the reference nor the probes
knew.

OUT/
  run.json               config, seed, git commit
  calibration/           captures the cost model is fitted on (when made here)
  oracle/                the oracle trace the simulator replays (when captured here)
  live/NN/rK             the live capture of configuration NN in round K
  live/NN/rK.speed.json  the speed probes' seconds right before and after that run
  configs/NN.json        one finished configuration (written as soon as it finishes)
  configs/NN.error.json  a configuration that failed; the others go on
  validation.json        everything above, summarised; validation.parquet the error table
  latencies.parquet      per request and source (measured/simulated): TTFT, TPOT, end-to-end
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from testbed import atomic
from testbed.compare import (
    GOAL_METRICS,
    error_rows,
    exit_histogram,
    kendall_tau,
    noise_rows,
    relative_error,
    resolved_pairs,
    total_variation,
)
from testbed.core import SchedulerConfig
from testbed.core.policy_set import PolicyConfig
from testbed.errors import ConfigError, EetbError
from testbed.runinfo import to_jsonable, write_run_info
from testbed.sim.cost_model import FittedCostModel, build_cost_model, price_capture_s
from testbed.sim.metrics import RequestRecord, compute_metrics
from testbed.sim.simulator import SimulationConfig, simulate
from testbed.trace import Capture, read_capture

VALIDATION_SCHEMA_VERSION = 1
ENGINES = ("native", "vllm")
BASELINE = PolicyConfig()
PROBES_PER_SIDE = 3  # speed probes right before and right after each run (probe_time_s)
ProgressFn = Callable[[str, int, int, str], None]  # (phase, done, total, note)


class ValidationError(EetbError):
    """A validation cannot start: no configuration, no calibration, an unknown engine."""


@dataclass(frozen=True)
class ValidationConfig:
    policies: tuple[PolicyConfig, ...]  # to validate; `full` is run first whether listed or not
    workload: str  # arrival-paced on the engine, replayed by the simulator
    calibration: str = ""  # "DIR[+DIR...]": captures the fitted cost model learns from
    calibration_workload: str = ""  # or: capture calibration runs of this workload here
    trace: str = ""  # oracle capture of `workload` to replay; "": capture one here
    engine: str = "native"
    model: str = "builtin"
    dataset: str = "cnndm"  # prompt source (references for ROUGE-L when it has them)
    seed: int = 0
    data_dir: str | None = None
    # rounds of runs, round-robin over the configurations (calibration runs first in each): a
    # slow spell of a shared machine then spreads over every configuration; measured = median
    repeats: int = 3
    device: str = "auto"  # the native engine's (testbed.engine.device); vLLM picks its own
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValidationError(f"repeats must be >= 1, got {self.repeats}")
        if self.engine not in ENGINES:
            raise ValidationError(f"unknown engine {self.engine!r} (known: {', '.join(ENGINES)})")
        if not self.policies:
            raise ValidationError("no configuration to validate (an empty ranking?)")
        if not (self.calibration or self.calibration_workload):
            raise ValidationError(
                "validation needs a calibration run for the cost model: give --calibration "
                "DIR[+DIR] (captures of another run) or --calibrate WORKLOAD"
            )

    @property
    def configurations(self) -> tuple[PolicyConfig, ...]:
        rest = [p for p in self.policies if p != BASELINE]
        return (BASELINE, *dict.fromkeys(rest))


@dataclass(frozen=True)
class ValidationResult:
    out: Path
    summary: dict[str, Any]  # validation.json


# --- engines --------------------------------------------------------------------------------


class EngineRuns:
    """Live and oracle captures on the chosen engine, for this run's requests."""

    def __init__(self, cfg: ValidationConfig) -> None:
        from testbed.builtin_model import resolve_model_dir
        from testbed.engine.capture import build_requests
        from testbed.model.checkpoint import load_checkpoint

        self.cfg = cfg
        self.model_dir = resolve_model_dir(cfg.model)
        self.ckpt = load_checkpoint(self.model_dir)
        self.max_model_len = min(
            SchedulerConfig().max_model_len, self.ckpt.config.max_position_embeddings
        )
        self.requests, _ = build_requests(
            cfg.workload, cfg.dataset, self.ckpt, seed=cfg.seed, data_dir=cfg.data_dir
        )
        self._probe = None  # SpeedProbe, made when first timed

    def with_config(self, cfg: ValidationConfig) -> EngineRuns:
        """This loaded model and request stream under another configuration list."""
        same = ("workload", "engine", "model", "dataset", "seed", "data_dir")
        if any(getattr(cfg, k) != getattr(self.cfg, k) for k in same):
            raise ValidationError(
                f"an engine loaded for {self.cfg.workload!r} cannot run another setup"
            )
        other = copy.copy(self)
        other.cfg = cfg
        return other

    @property
    def scheduler(self) -> SchedulerConfig:
        return SchedulerConfig(max_model_len=self.max_model_len)

    def probe_s(self) -> float:
        """The speed probe's seconds now (built on first use; one warm-up run)."""
        from testbed.engine.speed_probe import SpeedProbe

        if self._probe is None:
            self._probe = SpeedProbe(self.ckpt, device=self.cfg.device, dtype=self.cfg.dtype)
            self._probe.measure_s()
        return self._probe.measure_s()

    def timed_capture(self, policy: PolicyConfig, mode: str, out: Path, requests=None) -> Path:
        """``capture`` between PROBES_PER_SIDE speed probes on each side, recorded in
        ``speed_file(out)`` last: a run without that file is unfinished."""
        speed_file(out).unlink(missing_ok=True)
        before_s = [self.probe_s() for _ in range(PROBES_PER_SIDE)]
        path = self.capture(policy, mode, out, requests)
        after_s = [self.probe_s() for _ in range(PROBES_PER_SIDE)]
        _write_json(speed_file(out), {"before_s": before_s, "after_s": after_s})
        return path

    def capture(self, policy: PolicyConfig, mode: str, out: Path, requests=None) -> Path:
        from testbed.capture_records import CaptureConfig, EngineConfig
        from testbed.engine.capture import run_capture

        reqs = self.requests if requests is None else requests
        engine_cfg = EngineConfig(policy=policy, scheduler=self.scheduler,
                                  device=self.cfg.device, dtype=self.cfg.dtype)  # fmt: skip
        cap = CaptureConfig(mode=mode, engine=engine_cfg, workload=self.cfg.workload,
                            seed=self.cfg.seed)  # fmt: skip
        shutil.rmtree(out, ignore_errors=True)  # an unfinished earlier attempt
        if self.cfg.engine == "native":
            return run_capture(self.ckpt, reqs, cap, out)
        try:  # optional dependency: the `vllm` extra
            from testbed.vllm_backend.capture import run_vllm_capture
        except ImportError as exc:
            raise ConfigError(
                f"--engine vllm needs vLLM: pip install -e '.[vllm]' ({exc})"
            ) from None
        return run_vllm_capture(self.model_dir, reqs, cap, out)

    def calibration_requests(self, workload: str):
        # another seed: the calibration never sees the validation's own requests
        from testbed.engine.capture import build_requests

        reqs, _ = build_requests(
            workload,
            self.cfg.dataset,
            self.ckpt,
            seed=self.cfg.seed + 1,
            data_dir=self.cfg.data_dir,
        )
        return reqs

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.ckpt.tokenizer.decode(list(token_ids))


# --- machine speed -----------------------------------------------------------------------------


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


def _is_finished(run: Path) -> bool:
    return (run / "meta.json").is_file() and speed_file(run).is_file()


def _is_finished_run_of(run: Path, policy: PolicyConfig) -> bool:
    """A finished run to reuse. One of another policy is an error, not a result to reuse or
    overwrite: OUT was made for another configuration list (another --top, another sweep)."""
    if not _is_finished(run):
        return False
    recorded = json.loads((run / "meta.json").read_text()).get("policy")
    if recorded != to_jsonable(policy):
        raise ValidationError(
            f"{run} is a run of another policy than {policy.label()}: this folder was made "
            "for another configuration list; give a new --out"
        )
    return True


@dataclass(frozen=True)
class Calibration:
    cost_model: str  # fitted on the calibration runs, at the reference speed where probed
    reference_probe_s: float | None  # their median probe time; None: runs made unprobed


def fitted_at_reference(dirs: Sequence[str]) -> Calibration:
    """The fitted spec over calibration runs, each run's durations scaled to the median probe
    time of them all (``F*DIR``, F = reference / its probe time). Unprobed runs (given with
    --calibration from elsewhere) are fitted as they are."""
    probes = [probe_time_s(Path(d)) for d in dirs]
    if any(p is None for p in probes):
        return Calibration("fitted:" + "+".join(dirs), None)
    reference = float(np.median(probes))
    parts = [f"{reference / p:.5f}*{d}" for d, p in zip(dirs, probes, strict=True)]
    return Calibration("fitted:" + "+".join(parts), reference)


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


@dataclass(frozen=True)
class RunSpeed:
    """How much slower than the calibration's reference speed the machine ran one measured run
    (1.0: at the reference speed; 1.2: 20% slower)."""

    probed: float  # its speed probes' median over the reference's: known beside the run
    steps: float | None  # its steps' seconds over the fit's price of them: known only after it


# --- measured side ------------------------------------------------------------------------------


def capture_records(cap: Capture) -> list[RequestRecord]:
    """The requests of a live capture as the simulator's records, with their real exit layers."""
    tokens = cap.tokens.sort_by([("request_id", "ascending"), ("position", "ascending")])
    rid = tokens["request_id"].to_numpy()
    layers = tokens["exit_layer"].to_numpy()
    forced = tokens["is_forced"].to_numpy()
    bounds = np.flatnonzero(np.r_[True, rid[1:] != rid[:-1], True]) if len(rid) else []
    spans = {int(rid[a]): (a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)}
    records = []
    for r in cap.requests.to_pylist():
        a, b = spans.get(r["request_id"], (0, 0))
        records.append(RequestRecord(
            request_id=r["request_id"], arrival_s=r["arrival_s"],
            first_token_s=r["first_token_s"], finish_s=r["finish_s"],
            num_prompt_tokens=r["num_prompt_tokens"], num_output_tokens=r["num_output_tokens"],
            exit_layers=tuple(int(x) for x in layers[a:b]),
            num_forced_exits=int(forced[a:b].sum()), num_preemptions=r["num_preemptions"],
        ))  # fmt: skip
    return records


def capture_outputs(cap: Capture) -> dict[int, list[int]]:
    """Emitted token ids per request id, in order."""
    out: dict[int, list[int]] = {}
    tokens = cap.tokens.sort_by([("request_id", "ascending"), ("position", "ascending")])
    for rid, tok in zip(
        tokens["request_id"].to_pylist(), tokens["token_id"].to_pylist(), strict=True
    ):
        out.setdefault(rid, []).append(tok)
    return out


def agreement_with(outputs: dict[int, list[int]], full: dict[int, list[int]]) -> float:
    """Token-weighted fraction of positions equal to the `full` run's output."""
    same = total = 0
    for rid, ids in outputs.items():
        ref = full.get(rid, [])
        total += max(len(ids), len(ref))
        same += sum(x == y for x, y in zip(ids, ref, strict=False))
    return same / total if total else 1.0


def _latency_rows(label: str, source: str, records: Sequence[RequestRecord]) -> list[dict]:
    rows = []
    for r in records:
        n = r.num_output_tokens
        tpot = (r.finish_s - r.first_token_s) / (n - 1) if n > 1 else None
        rows.append({"policy": label, "source": source, "request_id": r.request_id,
                     "ttft_s": r.first_token_s - r.arrival_s, "tpot_s": tpot,
                     "e2e_s": r.finish_s - r.arrival_s})  # fmt: skip
    return rows


# --- one configuration --------------------------------------------------------------------------


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    atomic.write_json(path, to_jsonable(doc))


def _median_metrics(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per metric, the median over repeated runs (None where any run has none)."""
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        out[key] = None if any(v is None for v in values) else float(np.median(values))
    return out


def _simulate_at(engine: EngineRuns, policy: PolicyConfig, oracle: str, cost_model: str,
                 factor: float):  # fmt: skip
    cfg = engine.cfg
    spec = cost_model if factor == 1.0 else f"{factor:.5f}*{cost_model}"
    return simulate(SimulationConfig(
        trace=oracle, workload=cfg.workload, policy=policy, cost_model=spec,
        scheduler=engine.scheduler, seed=cfg.seed, data_dir=cfg.data_dir,
        max_model_len=engine.max_model_len,
    ))  # fmt: skip


def _predicted_at(engine: EngineRuns, policy: PolicyConfig, oracle: str, cost_model: str,
                  factors: Sequence[float | None]) -> dict[str, Any] | None:  # fmt: skip
    """The median over runs, each simulated with step times x its factor; None when a run's
    factor is unknown."""
    if any(f is None for f in factors):
        return None
    sims = [_simulate_at(engine, policy, oracle, cost_model, f) for f in factors]
    return _median_metrics([sim.metrics.to_dict() for sim in sims])


def _validate_one(
    index: int, policy: PolicyConfig, engine: EngineRuns, oracle: str, cost_model: str,
    lives: Sequence[Capture], speeds: Sequence[RunSpeed],
    full_outputs: dict[int, list[int]] | None, references: dict[int, str] | None,
) -> dict[str, Any]:  # fmt: skip
    """Measured (median over the repeated live runs) against predicted (at the calibration's
    reference speed), predicted_probed (median over the same runs, each simulated at the
    speed its probes saw) and predicted_hindsight (each at the speed its own steps ran), for
    one configuration. Quality and agreement come from the first run; measured exit layers and
    latencies pool every run."""
    records_by_run = [capture_records(live) for live in lives]
    per_run = [compute_metrics(records, []).to_dict() for records in records_by_run]
    measured = _median_metrics(per_run)
    records = [r for run in records_by_run for r in run]
    sim = _simulate_at(engine, policy, oracle, cost_model, 1.0)
    predicted = sim.metrics.to_dict()
    predicted_probed = _predicted_at(engine, policy, oracle, cost_model,
                                     [x.probed for x in speeds])  # fmt: skip
    predicted_hindsight = _predicted_at(engine, policy, oracle, cost_model,
                                        [x.steps for x in speeds])  # fmt: skip
    outputs = capture_outputs(lives[0])
    num_layers = lives[0].num_layers
    hist_real = exit_histogram([x for r in records for x in r.exit_layers], num_layers)
    hist_sim = exit_histogram([x for r in sim.requests for x in r.exit_layers], num_layers)
    if index == 0:
        measured_agreement = 1.0  # `full` itself
    else:  # None when the `full` run failed: nothing to agree with
        measured_agreement = None if full_outputs is None else agreement_with(outputs, full_outputs)
    rouge_l = None
    if references:
        from testbed.quality import rouge

        rids = sorted(r for r in outputs if r in references)
        if rids:
            texts = [engine.decode(outputs[r]) for r in rids]
            rouge_l = rouge(texts, [references[r] for r in rids]).rougeL
    replay = {
        "exit_hist_measured": hist_real,
        "exit_hist_predicted": hist_sim,
        "exit_hist_tv": total_variation(hist_real, hist_sim),
        "mean_exit_layer_measured": measured["mean_exit_layer"],
        "mean_exit_layer_predicted": sim.metrics.mean_exit_layer,
        "agreement_measured": measured_agreement,
        "agreement_predicted": sim.metrics.est_agreement,
    }
    return {
        "index": index, "policy": to_jsonable(policy), "label": policy.label(),
        "measured": measured, "measured_runs": per_run, "predicted": predicted,
        "predicted_probed": predicted_probed, "predicted_hindsight": predicted_hindsight,
        "dilations": [x.probed for x in speeds], "step_dilations": [x.steps for x in speeds],
        "rouge_l": rouge_l, "replay": replay,
        "latencies": _latency_rows(policy.label(), "measured", records)
        + _latency_rows(policy.label(), "simulated", sim.requests),
        "outputs": outputs if index == 0 else None,  # `full`'s, for the others' agreement
    }  # fmt: skip


# --- the whole validation -----------------------------------------------------------------------


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
    if not (path / "meta.json").is_file():
        if progress is not None:
            progress("oracle", 0, 1, "capturing the oracle trace")
        engine.capture(BASELINE, "oracle", path)
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
                _write_json(out / "configs" / f"{i:02d}.error.json", failed[i])
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
        _write_json(out / "configs" / f"{i:02d}.json", doc)
        (out / "configs" / f"{i:02d}.error.json").unlink(missing_ok=True)
        done.append(doc)
    if progress is not None:
        progress("validate", len(configs), len(configs), "compared with the simulator")
    summary = summarise(cfg, done, list(failed.values()), calibration, getattr(fit, "report", None))
    _write_outputs(out, summary, done)
    return ValidationResult(out, summary)


def summarise(
    cfg: ValidationConfig, done: Sequence[dict[str, Any]], failed: Sequence[dict[str, Any]],
    calibration: Calibration, fit_report: Any,
) -> dict[str, Any]:  # fmt: skip
    def compared(key: str) -> tuple[list[dict[str, Any]], float | None, float | None]:
        """Error rows, Kendall tau of throughput and the largest goal error of predictions
        ``key`` (all at the reference speed, each run at its probed speed, or in hindsight
        at the speed its steps ran)."""
        rows = [row for d in done for row in error_rows(d["label"], d[key], d["measured"])]
        tau = kendall_tau([d[key]["throughput_tokens_per_s"] for d in done],
                          [d["measured"]["throughput_tokens_per_s"] for d in done])  # fmt: skip
        goal = [abs(r["error"]) for r in rows
                if r["metric"] in GOAL_METRICS and r["error"] is not None]  # fmt: skip
        return rows, tau, max(goal) if goal else None

    errors, tau, worst = compared("predicted")
    # the pairs whose order the rounds agree on (4 of 5): what tau misses beyond them is noise;
    # None when no pair is resolved
    runs = [[r["throughput_tokens_per_s"] for r in d["measured_runs"]] for d in done]
    pairs = resolved_pairs(runs)
    tau_resolved = kendall_tau(
        [d["predicted"]["throughput_tokens_per_s"] for d in done],
        [d["measured"]["throughput_tokens_per_s"] for d in done],
        pairs,
    )
    errors_probed, tau_probed, worst_probed = compared("predicted_probed")
    has_hindsight = all(d["predicted_hindsight"] is not None for d in done)
    errors_hindsight, tau_hindsight, worst_hindsight = (
        compared("predicted_hindsight") if has_hindsight else ([], None, None)
    )
    noise = [row for d in done for row in noise_rows(
        d["label"], d["measured_runs"], d["predicted"], d["predicted_hindsight"])]  # fmt: skip
    judged = [r["forecast_inside"] for r in noise if r["forecast_inside"] is not None]
    resolved = set(pairs)
    unordered = [[done[i]["label"], done[j]["label"]] for i in range(len(done))
                 for j in range(i + 1, len(done)) if (i, j) not in resolved]  # fmt: skip
    full = next((d for d in done if d["index"] == 0), None)
    configs = []
    for d in done:
        base_m = full["measured"]["throughput_tokens_per_s"] if full else None
        base_p = full["predicted"]["throughput_tokens_per_s"] if full else None
        speedup_m = None if base_m is None else d["measured"]["throughput_tokens_per_s"] / base_m
        speedup_p = None if base_p is None else d["predicted"]["throughput_tokens_per_s"] / base_p
        configs.append({
            "index": d["index"], "label": d["label"], "policy": d["policy"],
            "speedup_measured": speedup_m, "speedup_predicted": speedup_p,
            "speedup_error": relative_error(speedup_p, speedup_m),
            "rouge_l": d["rouge_l"], **d["replay"],
            # the spread the medians hide: each repeated run's throughput and mean TPOT
            "throughput_runs": [r["throughput_tokens_per_s"] for r in d["measured_runs"]],
            "tpot_mean_runs_s": [r["tpot_mean_s"] for r in d["measured_runs"]],
            "measured": d["measured"], "predicted": d["predicted"],
            "predicted_probed": d["predicted_probed"],
            # per run: the probe's time over the calibration's median (1.2: 20% slower), and
            # its own steps' seconds over the fit's price of them
            "dilation_runs": d["dilations"], "step_dilation_runs": d["step_dilations"],
            "predicted_hindsight": d["predicted_hindsight"],
        })  # fmt: skip
    return {
        "schema_version": VALIDATION_SCHEMA_VERSION,
        "config": to_jsonable(cfg),
        "repeats": cfg.repeats,
        "engine": cfg.engine,
        "workload": cfg.workload,
        "cost_model": calibration.cost_model,
        "reference_probe_s": calibration.reference_probe_s,
        "fit": None if fit_report is None else {"r2": fit_report.r2, "num_steps": fit_report.num_steps,
                                                 "coefficients": fit_report.coefficients},
        "configurations": configs,
        "errors": errors,
        "kendall_tau_throughput": tau,
        "kendall_tau_resolved": tau_resolved,
        "num_pairs_resolved": len(pairs),
        "num_pairs": len(done) * (len(done) - 1) // 2,
        # the measurement's own repeatability, per configuration and goal metric, and the
        # pairs it cannot order (the rounds split on them): no ranking claim is made there
        "noise": noise,
        "forecast_inside_range": sum(judged) / len(judged) if judged else None,
        "unordered_pairs": unordered,
        "max_goal_error": worst,
        # the same comparison with each run predicted at the speed its probes measured
        "errors_probed": errors_probed,
        "kendall_tau_throughput_probed": tau_probed,
        "max_goal_error_probed": worst_probed,
        # in hindsight: each run predicted at the speed its own steps ran (no forecast: what is
        # left is the simulator's error, not the machine's speed)
        "errors_hindsight": errors_hindsight,
        "kendall_tau_throughput_hindsight": tau_hindsight,
        "max_goal_error_hindsight": worst_hindsight,
        "missing": [{"label": f["label"], "message": f["message"]} for f in failed],
    }  # fmt: skip


def _write_outputs(out: Path, summary: dict[str, Any], done: Sequence[dict[str, Any]]) -> None:
    _write_json(out / "validation.json", summary)
    if summary["errors"]:
        pq.write_table(pa.Table.from_pylist(summary["errors"]), out / "validation.parquet")
    latencies = [row for d in done for row in d["latencies"]]
    if latencies:
        pq.write_table(pa.Table.from_pylist(latencies), out / "latencies.parquet")


# --- choosing what to validate ------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    trace: str
    workload: str
    cost_model: str
    policies: tuple[PolicyConfig, ...]


def policy_of(row: dict[str, Any]) -> PolicyConfig:
    """The PolicyConfig of a sweep results row (the inverse of sweep.config_columns)."""
    if row["is_baseline"]:
        return BASELINE
    params = tuple(sorted(json.loads(row["batching_params"] or "{}").items()))
    return PolicyConfig(
        batching=row["batching"], batching_params=params, exit_rule=row["rule"],
        threshold=row["threshold"], min_exit_layer=row["min_exit_layer"],
        exit_stride=row["exit_stride"], kv_fill=row["kv_fill"], decay_tau=row["decay_tau"],
    )  # fmt: skip


def _apart(rows: Sequence[dict[str, Any]], taken: Sequence[float], min_gap: float,
           limit: int) -> list[dict[str, Any]]:  # fmt: skip
    """Up to ``limit`` rows in order, each with a throughput at least ``min_gap`` (relative)
    from those of ``taken`` and of every row kept before it."""
    kept, seen = [], list(taken)
    for r in rows:
        t = r["throughput_tokens_per_s"]
        if len(kept) < limit and all(abs(t / u - 1.0) >= min_gap for u in seen):
            kept.append(r)
            seen.append(t)
    return kept


def _evenly(rows: Sequence[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """n rows evenly down a best-first list: for n = 2 the middle and the slowest."""
    if n <= 0 or not rows:
        return []
    ends = np.linspace(0, len(rows) - 1, n + 1)[1:]
    return [rows[i] for i in sorted({round(float(x)) for x in ends})]


def select_from_sweep(
    sweep_dir: Path, top_k: int, *, workload: str | None = None, cost_model: str | None = None,
    spread: int = 0, min_gap: float = 0.0,
) -> Selection:  # fmt: skip
    """The top k early-exit runs of a sweep's ranking (its quality constraint applied), from one
    workload × cost-model group: the first one, or the one named. ``spread`` more come from
    the rest of that group's runs, evenly down to the slowest: near-ties at the top make a
    rank test measure noise, configurations far apart test whether the ranking holds.

    ``min_gap`` > 0 passes over a run whose simulated throughput is within that fraction of
    `full`'s or of one already chosen (a policy that never exits, two batching policies that
    schedule alike), while enough others are left: a shared machine's medians of one
    configuration wander by a few percent, so a tie is ordered by chance. Slots the distinct
    runs cannot fill go to the passed-over ones, best first."""
    from testbed.sweep import rank_runs

    results = Path(sweep_dir) / "results.parquet"
    if not results.is_file():
        raise ValidationError(f"{sweep_dir}: no results.parquet (not a finished sweep?)")
    if top_k < 1 or spread < 0:
        raise ValidationError(f"--top must be >= 1 and --spread >= 0, got {top_k} and {spread}")
    if not 0.0 <= min_gap < 1.0:
        raise ValidationError(f"--min-gap must be in [0, 1), got {min_gap}")
    try:
        rows = pq.read_table(results).to_pylist()
    except (OSError, pa.ArrowInvalid) as exc:
        raise ValidationError(f"{results}: unreadable ({exc})") from None
    info_path = Path(sweep_dir) / "run.json"
    min_agreement = (
        json.loads(info_path.read_text()).get("min_agreement") if info_path.is_file() else None
    )
    ranked = [r for r in rank_runs(rows, min_agreement) if not r["is_baseline"]]
    if workload is not None:
        ranked = [r for r in ranked if r["workload"] == workload]
    if cost_model is not None:
        ranked = [r for r in ranked if r["cost_model"] == cost_model]
    if not ranked:
        raise ValidationError(
            f"{sweep_dir}: the ranking is empty (no early-exit run meets the constraint)"
        )
    first = ranked[0]
    key = (first["workload"], first["cost_model"])
    in_group = [r for r in rows if (r["workload"], r["cost_model"]) == key]
    group = [r for r in ranked if (r["workload"], r["cost_model"]) == key]
    base = [r["throughput_tokens_per_s"] for r in in_group if r["is_baseline"]]
    chosen = _apart(group, base, min_gap, top_k)
    chosen += [r for r in group if r not in chosen][: top_k - len(chosen)]
    chosen.sort(key=group.index)  # best first, as ranked
    if spread:
        # the rest of the group's early-exit runs, constraint or not, best first
        policies = {policy_of(r) for r in chosen}
        rest = [r for r in rank_runs(in_group, None) if not r["is_baseline"]
                and policy_of(r) not in policies]  # fmt: skip
        taken = base + [r["throughput_tokens_per_s"] for r in chosen]
        picks = _evenly(_apart(rest, taken, min_gap, len(rest)), spread)
        picks += _evenly([r for r in rest if r not in picks], spread - len(picks))
        chosen += picks
    return Selection(
        trace=first["trace"], workload=first["workload"], cost_model=first["cost_model"],
        policies=tuple(policy_of(r) for r in chosen),
    )  # fmt: skip
