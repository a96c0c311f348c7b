"""``--suite validation``: the demo's loop (calibrate → oracle capture → sweep →
validate top 3 + full) on three workloads; prints simulated-vs-measured errors and Kendall tau."""

from __future__ import annotations

import json
from pathlib import Path

from testbed.bench.options import Progress, Say
from testbed.demo import DemoConfig, demo_config, run_demo
from testbed.errors import ConfigError
from testbed.runinfo import write_run_info
from testbed.validation_records import ValidationResults, chance_inside_range

AZURE = "azure_llm_trace_2023/AzureLLMInferenceTrace_conv.csv"
OUTPUT_TOKENS = 48
# the demo's request shape, reused by the saturated load
SHAPE = f"prompt=64-320,output={OUTPUT_TOKENS}"
# a burst (every request at once) of that shape: `full`'s throughput on it is the capacity
BURST = f"poisson:rate=1000,n=64,{SHAPE}"
DEMO_RATE = 24  # the demo's arrival rate (DemoConfig.workload)
LOAD_OF_CAPACITY = 0.9  # "near saturation": 90% of the capacity, in requests per second
WORKLOAD_NAMES = ("demo", "poisson-saturated", "azure-scaled")


def workloads(capacity_tokens_per_s: float, num_requests: int | None = None,
              eos: str = "stop") -> tuple[tuple[str, str, str], ...]:  # fmt: skip
    """(name, workload, calibration workload): the demo's own (overloaded); a Poisson load at
    90% of the capacity this machine has today (its speed differs by tens of percent from day to
    day, so a fixed rate is saturated on one day and light on another); the Azure conversation
    trace's first requests time-scaled to 3 requests/s. ``num_requests`` sets every stream's
    length (a model 13x slower than the built-in one cannot run the default lengths' 130 runs
    in an hour); None keeps the demo's own workload and the default lengths. eos="ignore"
    runs every request to its output length, so the engine and the replay emit the same number
    of tokens whatever the exit rule does to the text (their timing alone is then compared)."""
    rate = round(LOAD_OF_CAPACITY * capacity_tokens_per_s / OUTPUT_TOKENS, 1)
    if num_requests is None:
        demo, demo_cal, (n, n_cal), (m, m_cal) = (
            DemoConfig.workload, DemoConfig.calibration_workload, (96, 48), (48, 32)
        )  # fmt: skip
    else:
        n = n_cal = m = m_cal = num_requests
        demo = demo_cal = f"poisson:rate={DEMO_RATE},n={num_requests},{SHAPE}"
    if eos not in ("stop", "ignore"):
        raise ConfigError(f"eos must be stop or ignore, got {eos!r}")
    tail = ",eos=ignore" if eos == "ignore" else ""
    chosen = (
        ("demo", demo, demo_cal),
        ("poisson-saturated", f"poisson:rate={rate},n={n},{SHAPE}",
         f"poisson:rate={rate},n={n_cal},{SHAPE}"),
        ("azure-scaled", f"azure:path={AZURE},n={m},rate=3",
         f"azure:path={AZURE},n={m_cal},rate=3"),
    )  # fmt: skip
    return tuple((name, w + tail, cal + tail) for name, w, cal in chosen)


def capacity_tokens_per_s(out: Path, data_dir: str | None, model: str = "builtin") -> float:
    """`full`'s output tokens per second on BURST, measured now on the native engine."""
    from testbed.sim.metrics import compute_metrics
    from testbed.trace import read_capture
    from testbed.validate import BASELINE, EngineRuns, ValidationConfig
    from testbed.validate.measured import live_records

    cfg = ValidationConfig(policies=(BASELINE,), workload=BURST, calibration_workload=BURST,
                           data_dir=data_dir, model=model)  # fmt: skip
    path = EngineRuns(cfg).capture(BASELINE, "live", out / "capacity")
    records = live_records(read_capture(path))
    return compute_metrics(records, []).throughput_tokens_per_s


def recorded_capacity(out: Path, model: str = "builtin", eos: str = "stop") -> float | None:
    """The capacity an earlier run into ``out`` measured, when its burst run finished: a rerun
    then validates the same workloads and reuses every finished run. A folder of another
    model's bench, or of another eos rule, is refused (its runs would be reused for this one)."""
    info, burst = out / "run.json", out / "capacity" / "meta.json"
    if not (info.is_file() and burst.is_file()):
        return None
    config = json.loads(info.read_text())["config"]
    if config.get("model", "builtin") != model:
        raise ConfigError(
            f"{out} holds the validation bench of model {config.get('model', 'builtin')!r}, not "
            f"{model!r}; give another --out"
        )
    if config.get("eos", "stop") != eos:
        raise ConfigError(
            f"{out} holds the validation bench run with eos={config.get('eos', 'stop')}, not "
            f"eos={eos}; give another --out"
        )
    return config.get("capacity_tokens_per_s")


def run(out: Path, data_dir: str | None, names: list[str] | None = None, *, say: Say = print,
        progress: Progress | None = None, model: str = "builtin",
        repeats: int = DemoConfig.repeats, num_requests: int | None = None,
        eos: str = "stop") -> list[tuple]:  # fmt: skip
    unknown = sorted(set(names or ()) - set(WORKLOAD_NAMES))
    if unknown or names == []:
        raise ConfigError(
            f"unknown validation workload(s) {', '.join(unknown) or '(none given)'} "
            f"(known: {', '.join(WORKLOAD_NAMES)})"
        )
    rows = []
    capacity = recorded_capacity(out, model, eos)
    if capacity is None:
        capacity = capacity_tokens_per_s(out, data_dir, model)
        say(f"capacity: {capacity:.0f} tokens/s at full depth on {BURST}")
    else:
        say(f"capacity: {capacity:.0f} tokens/s, as measured by the earlier run into {out}")
    chosen = [w for w in workloads(capacity, num_requests, eos) if names is None or w[0] in names]
    write_run_info(out, {"capacity_tokens_per_s": capacity, "workloads": chosen, "model": model,
                         "repeats": repeats, "num_requests": num_requests, "eos": eos},
                   seed=0,
                   suite="validation")  # fmt: skip
    inside: dict[str, tuple[int, int]] = {}  # workload: (forecasts inside the rounds' range, pairs)
    for name, workload, calibration in chosen:
        # the demo's own run is exactly `eetb demo`'s; the others validate their one workload
        higher = DemoConfig.higher_load if name == "demo" and num_requests is None else ""
        cfg = demo_config(
            model,
            workload=workload,
            higher_load=higher,
            calibration_workload=calibration,
            repeats=repeats,
        )
        run_demo(cfg, out / name, data_dir=data_dir, progress=progress)
        res = ValidationResults.read(out / name / "validate" / "validation.json")
        comparisons = (res.forecast, res.probed, res.hindsight)
        judged = [n.forecast_inside for n in res.noise if n.forecast_inside is not None]
        inside[name] = (sum(judged), len(judged))
        for c in res.configurations:
            errs = [cmp.error_of(c.label, m) for cmp in comparisons
                    for m in ("throughput_tokens_per_s", "tpot_mean_s")]  # fmt: skip
            rows.append((name, c.label, *errs, c.speedup_predicted, c.speedup_measured,
                         res.forecast.kendall_tau_throughput, res.probed.kendall_tau_throughput,
                         res.kendall_tau_resolved))  # fmt: skip
    _print_rows(rows, say)
    for name, (k, n) in inside.items():
        say(f"{name}: the forecast lies inside the rounds' measured range on {k} of {n} "
            "configuration x metric pairs (a forecast as good as one more round: "
            f"{chance_inside_range(repeats):.0%})")  # fmt: skip
    return rows


def _print_rows(rows: list[tuple], say: Say) -> None:
    # errors at the calibration's median speed; "probed": each run predicted at the machine
    # speed its speed probes measured beside it
    say(f"{'workload':18s} {'configuration':40s} {'tput err':>8s} {'TPOT err':>8s} "
          f"{'tput prb':>8s} {'TPOT prb':>8s} {'tput hnd':>8s} {'TPOT hnd':>8s} "
          f"{'speedup sim':>11s} {'speedup real':>12s} "
          f"{'tau':>6s} {'tau prb':>7s} {'tau res':>7s}")  # fmt: skip
    for name, label, *values in rows:
        errs, (s_sim, s_real, tau, tau_probed, tau_resolved) = values[:6], values[6:]
        say(
            f"{name:18s} {label:40s} "
            + " ".join(f"{_pct(e):>8s}" for e in errs)
            + f" {_num(s_sim):>11s} {_num(s_real):>12s} {_num(tau):>6s} {_num(tau_probed):>7s}"
            + f" {_num(tau_resolved):>7s}"
        )
    say(
        "tau res: over the pairs whose order at least 80% of the rounds agree on; hnd: in "
        "hindsight, each run at the speed its own steps ran (what is left is the simulator's)"
    )
    for title, lo in (("at the reference speed", 2), ("each run at its probed speed", 4),
                      ("in hindsight, each run at its steps' speed", 6)):  # fmt: skip
        goal = [abs(e) for r in rows for e in r[lo : lo + 2] if e is not None]
        if goal:
            say(f"{title}: largest |error| of throughput and mean TPOT over {len(rows)} "
                  f"validated runs: {max(goal):.1%}; within 10%: "
                  f"{sum(e <= 0.10 for e in goal)}/{len(goal)}; within 5%: "
                  f"{sum(e <= 0.05 for e in goal)}/{len(goal)}")  # fmt: skip


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1%}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
