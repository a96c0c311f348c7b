"""``eetb validate``: A/B-run a sweep's top policies and `full` on a real engine; compare each with
the simulator's prediction (error table, Kendall tau, replay error)."""

from __future__ import annotations

import sys
from pathlib import Path

from testbed.commands.common import (
    ProgressLine,
    add_engine_args,
    guarded,
    parser,
    policy_from_args,
)
from testbed.errors import ConfigError
from testbed.validate import ENGINES, ValidationConfig, run_validation, select_from_sweep
from testbed.validation_records import ValidationResults


def _args(argv: list[str]):
    p = parser("validate", "A/B-validate policies on a real engine against the simulator.")
    p.add_argument("sweep", nargs="?", type=Path, default=None,
                   help="a sweep's output folder: validate the top policies of its ranking "
                        "(without it: the one policy given by the early-exit options)")  # fmt: skip
    p.add_argument("--top", type=int, default=3, help="how many ranked policies (besides full)")
    p.add_argument("--spread", type=int, default=0,
                   help="also validate this many lower-ranked policies, evenly down to the "
                        "slowest, so the rank test has contrast")  # fmt: skip
    p.add_argument("--min-gap", type=float, default=0.0, metavar="FRACTION",
                   help="pass over a policy whose simulated throughput is within this fraction "
                        "of full's or of one already chosen (e.g. 0.03: near-ties are ordered "
                        "by the machine's noise)")  # fmt: skip
    p.add_argument("--workload", default=None,
                   help="arrival-paced workload (default: the sweep's ranked workload)")  # fmt: skip
    p.add_argument("--trace", default=None,
                   help="oracle capture of the workload to replay (default: the sweep's, or "
                        "one captured here)")  # fmt: skip
    p.add_argument("--calibration", default="",
                   help="DIR[+DIR]: captures of a separate run to fit the cost model on")  # fmt: skip
    p.add_argument("--calibrate", default="", metavar="WORKLOAD",
                   help="instead: capture calibration runs of this workload first")  # fmt: skip
    p.add_argument("--engine", choices=ENGINES, default="native")
    p.add_argument("--dataset", default="cnndm", help="prompt source (cnndm, xsum, scitldr, self)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/validate"), help="result folder")
    add_engine_args(p)
    return p.parse_args(argv)


@guarded
def main(argv: list[str]) -> int:
    args = _args(argv)
    workload, trace = args.workload, args.trace
    if args.sweep is not None:
        sel = select_from_sweep(args.sweep, args.top, workload=args.workload, spread=args.spread,
                                min_gap=args.min_gap)  # fmt: skip
        policies, workload = sel.policies, workload or sel.workload
        trace = trace if trace is not None else (sel.trace if workload == sel.workload else "")
    else:
        policies = (policy_from_args(args),)
        if workload is None:
            raise ConfigError("--workload is needed without a sweep folder")
    cfg = ValidationConfig(
        policies=tuple(policies), workload=workload, calibration=args.calibration,
        calibration_workload=args.calibrate, trace=trace or "", engine=args.engine,
        model=args.model, dataset=args.dataset, seed=args.seed, data_dir=args.data_dir,
        device=args.device, dtype=args.dtype,
    )  # fmt: skip
    result = run_validation(cfg, args.out, progress=ProgressLine(min_interval_s=0))
    print(error_table(result.results))
    print(f"wrote {result.out}")
    return 1 if result.results.missing else 0


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1%}"


def _num(value: float | None, fmt: str = ".4g") -> str:
    return "-" if value is None else format(value, fmt)


def error_table(res: ValidationResults) -> str:
    """Predicted vs measured per configuration (goal metrics and speedup), then replay error."""
    lines = [
        f"{'configuration':44s} {'metric':18s} {'predicted':>10s} {'measured':>10s} {'error':>8s}"
    ]
    goal = ("throughput tok/s", "mean TPOT ms", "mean TTFT ms")
    lines += [
        f"{r.policy:44s} {r.metric_label:18s} {_num(r.predicted):>10s} "
        f"{_num(r.measured):>10s} {_pct(r.error):>8s}"
        for r in res.forecast.errors if r.metric_label in goal
    ]  # fmt: skip
    lines += ["", f"{'configuration':44s} {'speedup sim':>11s} {'speedup real':>12s} "
              f"{'layers sim':>10s} {'layers real':>11s} {'exit TV':>7s} {'agree sim':>9s} "
              f"{'agree real':>10s} {'ROUGE-L':>7s}"]  # fmt: skip
    for c in res.configurations:
        lines.append(
            f"{c.label:44s} {_num(c.speedup_predicted, '.3f'):>11s} "
            f"{_num(c.speedup_measured, '.3f'):>12s} {_num(c.mean_exit_layer_predicted, '.2f'):>10s} "
            f"{_num(c.mean_exit_layer_measured, '.2f'):>11s} {c.exit_hist_tv:7.3f} "
            f"{_num(c.agreement_predicted, '.1%'):>9s} {_num(c.agreement_measured, '.1%'):>10s} "
            f"{_num(c.rouge_l, '.4f'):>7s}"
        )
    return "\n".join([*lines, "", *_verdict_lines(res)])


def _verdict_lines(res: ValidationResults) -> list[str]:
    lines = [f"Kendall tau (predicted vs measured throughput order): "
             f"{_num(res.forecast.kendall_tau_throughput, '.3f')}; largest |error| of throughput "
             f"and mean TPOT: {_pct(res.forecast.max_goal_error)}"]  # fmt: skip
    if res.num_pairs_resolved:
        lines.append(f"over the {res.num_pairs_resolved} of {res.num_pairs} pairs "
                     "whose order 80% of the rounds agree on: tau "
                     f"{_num(res.kendall_tau_resolved, '.3f')}")  # fmt: skip
    if res.forecast_inside_range is not None:
        mads = [r.mad_rel for r in res.noise if r.mad_rel is not None]
        floor = f"; rounds' MAD / median up to {max(mads):.1%}" if mads else ""
        lines.append(f"forecast inside the measured rounds' range on {res.forecast_inside_range:.0%} "
                     f"of configuration × metric pairs{floor}; "
                     f"{len(res.unordered_pairs)} of {res.num_pairs} pairs the "
                     "rounds cannot order")  # fmt: skip
    if res.reference_probe_s is not None:
        lines.append(
            "each run predicted at the speed its probes measured instead: "
            f"tau {_num(res.probed.kendall_tau_throughput, '.3f')}, largest |error| "
            f"{_pct(res.probed.max_goal_error)}"
        )
    if res.hindsight.max_goal_error is not None:
        lines.append(
            "in hindsight, each run at the speed its own steps ran (what is left is the "
            f"simulator's error): tau {_num(res.hindsight.kendall_tau_throughput, '.3f')}, "
            f"largest |error| {_pct(res.hindsight.max_goal_error)}"
        )
    return lines + [f"missing: {m.label}: {m.message}" for m in res.missing]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
