"""`eetb report RUN_DIR`: report.md with tables and PNG figures, readable without the code."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from analysis import figures
from analysis.load import RunData, load_run
from analysis.rank import with_speedups
from testbed import atomic
from testbed.cost_spec import CostModelError, CostModelSpec
from testbed.validation_records import ValidationResults, chance_inside_range

GOAL_ERROR = 0.10  # the validation goal: |simulated / measured - 1| for throughput and mean TPOT
GOAL_TAU = 0.6
TOP_ROWS = 10


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def short_cost_model(spec: str) -> str:
    """A cost model for a table: a fit over many captures as their count and common folder."""
    try:
        return CostModelSpec.parse(spec).short()
    except CostModelError:  # a results file of a spec this testbed no longer reads: as written
        return spec


def _validation_section(res: ValidationResults) -> list[str]:
    lines = _validation_intro(res)
    table, has_probed = _error_table(res)
    lines += [*table, "", _verdict(res, has_probed), ""]
    return [*lines, *_rounds_table(res), *_noise_section(res), *_replay_table(res)]


def _validation_intro(res: ValidationResults) -> list[str]:
    lines = ["## Simulated against measured", ""]
    fit = res.fit
    fit_text = "" if fit is None else f" (R² {fit.r2:.3f} over {fit.num_steps} steps)"
    lines += [
        f"Engine `{res.engine}`, workload `{res.workload}`. The simulator replays the "
        f"workload's oracle trace with the cost model `{short_cost_model(res.cost_model)}`"
        f"{fit_text}; calibration runs use another request stream than the runs measured here. "
        "Error is simulated / measured − 1.",
        "",
    ]
    if res.reference_probe_s is not None:
        lines += [
            "A short fixed speed probe ran three times right before and three times right "
            "after every run; a run's speed is the median of its probes (a momentary spike in "
            "one does not move it). "
            f"Median over the calibration runs: {1e3 * res.reference_probe_s:.1f} ms. The fit "
            "is normalised to that median and the simulator predicts at that speed; *error, "
            "probed* predicts each measured run at the speed its own probes saw instead (median "
            "over the runs). *Error, hindsight* predicts each run at the speed its own steps "
            "ran (their seconds over the fit's price of them, known only after the run): no "
            "forecast, but what is left there is the simulator's error, not the machine's.",
            "",
        ]
    return lines


def _error_table(res: ValidationResults) -> tuple[list[str], bool]:
    """The goal metrics' errors per configuration, at the reference speed and (where made) at
    each run's probed speed and in hindsight; returns the table and whether it has the probed
    column."""
    goal = {"throughput_tokens_per_s", "tpot_mean_s", "ttft_mean_s", "e2e_mean_s"}
    extra = {title: cmp for title, cmp in (("error, probed", res.probed),
                                           ("error, hindsight", res.hindsight)) if cmp.errors}  # fmt: skip
    rows = [
        [r.policy, r.metric_label, _fmt(r.predicted, ".4g"), _fmt(r.measured, ".4g"),
         _fmt(r.error, "+.1%"), *(_fmt(cmp.error_of(r.policy, r.metric), "+.1%")
                                  for cmp in extra.values())]
        for r in res.forecast.errors if r.metric in goal
    ]  # fmt: skip
    header = ["configuration", "metric", "simulated", "measured", "error"]
    return _table(header + list(extra), rows), "error, probed" in extra


def _verdict(res: ValidationResults, has_probed: bool) -> str:
    tau, worst = res.forecast.kendall_tau_throughput, res.forecast.max_goal_error
    verdict = []
    if worst is not None:
        ok = "meets" if worst <= GOAL_ERROR else "misses"
        verdict.append(f"largest |error| of throughput and mean TPOT: {worst:.1%} ({ok} the "
                       f"{GOAL_ERROR:.0%} goal)")  # fmt: skip
    if tau is not None:
        ok = "meets" if tau >= GOAL_TAU else "misses"
        verdict.append(f"Kendall tau of the throughput order: {tau:.3f} ({ok} the {GOAL_TAU} goal)")
    if res.num_pairs_resolved:
        verdict.append(f"over the {res.num_pairs_resolved} of {res.num_pairs} pairs whose "
                       "order at least 80% of the rounds agree on (the others the measurement "
                       f"cannot order): tau {_fmt(res.kendall_tau_resolved, '.3f')}")  # fmt: skip
    if has_probed and res.probed.max_goal_error is not None:
        verdict.append(f"each run at its probed speed: {res.probed.max_goal_error:.1%} and tau "
                       f"{_fmt(res.probed.kendall_tau_throughput, '.3f')}")  # fmt: skip
    if res.hindsight.max_goal_error is not None:
        verdict.append("in hindsight, each run at the speed its steps ran: "
                       f"{res.hindsight.max_goal_error:.1%} and tau "
                       f"{_fmt(res.hindsight.kendall_tau_throughput, '.3f')}")  # fmt: skip
    return "; ".join(verdict) + "." if verdict else ""


def _rounds_table(res: ValidationResults) -> list[str]:
    """Each round's measured values beside the medians, with the machine's speed then."""
    lines: list[str] = []
    spread = [c for c in res.configurations if len(c.throughput_runs) > 1]
    if spread:
        lines += [f"Measured values are medians over {res.repeats} rounds of runs "
                  "(round-robin over the configurations). Each round's values:", ""]  # fmt: skip
        rows = [[c.label, " / ".join(f"{v:.1f}" for v in c.throughput_runs),
                 " / ".join(_fmt(v and 1e3 * v, ".2f") for v in c.tpot_mean_runs_s),
                 " / ".join(_fmt(v, ".2f") for v in c.dilation_runs),
                 " / ".join(_fmt(v, ".2f") for v in c.step_dilation_runs),
                 " / ".join(_fmt(v, ".2f") for v in c.cpu_share_runs)]
                for c in spread]  # fmt: skip
        header = ["configuration", "throughput tok/s", "mean TPOT ms", "probe time / reference",
                  "step time / fit price", "CPU s / wall s"]  # fmt: skip
        lines += [*_table(header, rows), ""]
    return lines


def _replay_table(res: ValidationResults) -> list[str]:
    lines: list[str] = []
    lines += ["### Speedup and replay error", "",
              "The oracle trace holds the full-depth token stream; a live early-exit run "
              "diverges once one of its tokens differs. Exit TV is the total variation distance "
              "between the simulated and the measured exit-layer distributions; agreement is "
              "the fraction of tokens equal to `full` (simulated: the trace's flags; measured: "
              "the `full` run's output). Tokens are the output tokens emitted: the simulator "
              "replays the trace's lengths, and a live run that diverged stops at its own "
              "end-of-sequence token (unless the workload runs every request to its length, "
              "`eos=ignore`, a trace replay's default), so throughput can differ where the "
              "run's duration does not.", ""]  # fmt: skip
    rows = [
        [c.label, _fmt(c.speedup_predicted, ".3f"), _fmt(c.speedup_measured, ".3f"),
         _fmt(c.mean_exit_layer_predicted, ".2f"), _fmt(c.mean_exit_layer_measured, ".2f"),
         f"{c.exit_hist_tv:.3f}", _fmt(c.agreement_predicted, ".1%"),
         _fmt(c.agreement_measured, ".1%"), _tokens(c.predicted),
         _tokens(c.measured), _fmt(c.rouge_l, ".4f")]
        for c in res.configurations
    ]  # fmt: skip
    header = ["configuration", "speedup sim", "speedup real", "layers sim", "layers real",
              "exit TV", "agree sim", "agree real", "tokens sim", "tokens real",
              "ROUGE-L"]  # fmt: skip
    return [*lines, *_table(header, rows), ""]


def _noise_section(res: ValidationResults) -> list[str]:
    """The measurement's repeatability beside the forecast: no error is read below it."""
    noise = [r for r in res.noise if r.mad_rel is not None]
    if not noise:
        return []
    lines = [
        "### Noise floor",
        "",
        "How repeatable each measurement is over its rounds: MAD / median of the rounds, "
        "their range, and whether the simulator's forecast (and its hindsight prediction) "
        "falls inside that range. *Error / noise* is the forecast's |error| in units of the "
        "noise floor: below 1 the simulator is as close as the machine repeats itself.",
        "",
    ]
    scale = {
        "throughput_tokens_per_s": (1.0, "throughput tok/s"),
        "tpot_mean_s": (1e3, "mean TPOT ms"),
    }
    rows = []
    for r in noise:
        k, name = scale.get(r.metric, (1.0, r.metric))
        rows.append([r.policy, name, _fmt(r.median * k, ".4g"), _fmt(r.mad_rel, ".1%"),
                     f"{r.low * k:.4g}–{r.high * k:.4g}",
                     _fmt(None if r.predicted is None else r.predicted * k, ".4g"),
                     _yes(r.forecast_inside), _yes(r.hindsight_inside),
                     _fmt(r.error_over_noise, ".1f")])  # fmt: skip
    header = ["configuration", "metric", "median", "MAD / median", "range", "simulated",
              "forecast inside", "hindsight inside", "error / noise"]  # fmt: skip
    lines += _table(header, rows)
    judged = [r for r in noise if r.forecast_inside is not None]
    if res.forecast_inside_range is not None:
        lines += ["", f"Forecast inside the measured range on {sum(r.forecast_inside for r in judged)} "
                  f"of {len(judged)} configuration × metric pairs ({res.forecast_inside_range:.0%}; "
                  f"goal 90%). {_chance_inside(res.repeats)}"]  # fmt: skip
    if res.unordered_pairs:
        shown = "; ".join(f"{a} vs {b}" for a, b in res.unordered_pairs[:12])
        more = f" and {len(res.unordered_pairs) - 12} more" if len(res.unordered_pairs) > 12 else ""
        lines += ["", f"Pairs this measurement cannot order (fewer than 80% of at least 3 rounds "
                  f"agree; no ranking claim is made between them): {shown}{more}."]  # fmt: skip
    return [*lines, ""]


def _chance_inside(num_rounds: int) -> str:
    if num_rounds < 2:
        return ""
    return (f"A forecast as good as one more round would land inside the range of {num_rounds} "
            f"rounds {chance_inside_range(num_rounds):.0%} of the time.")  # fmt: skip


def _yes(flag: bool | None) -> str:
    return "–" if flag is None else ("yes" if flag else "no")


def _tokens(metrics: dict[str, Any]) -> str:
    """Output tokens of a run (the median over rounds for measured ones)."""
    value = metrics.get("num_output_tokens")
    return "-" if value is None else f"{value:.0f}"


def _sweep_section(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["## Sweep", "",
             f"{len(rows)} simulated runs. Best throughput first within each workload × cost "
             "model; speedup is over the `full` run of the same group.", ""]  # fmt: skip
    ranked = with_speedups(rows)
    groups = list(dict.fromkeys((r["workload"], r["cost_model"]) for r in ranked))
    for workload, cost_model in groups:
        group = sorted((r for r in ranked if (r["workload"], r["cost_model"]) == (workload, cost_model)),
                       key=lambda r: -r["throughput_tokens_per_s"])  # fmt: skip
        lines += [f"### `{workload}` · `{short_cost_model(cost_model)}`", ""]
        table = [
            [r["policy"], f"{r['throughput_tokens_per_s']:.1f}", _fmt(r["speedup"], ".3f"),
             _fmt(r["est_agreement"], ".1%"), f"{r['mean_exit_layer']:.2f}",
             _fmt(r["tpot_p50_s"] and 1e3 * r["tpot_p50_s"], ".3g")]
            for r in group[:TOP_ROWS]
        ]  # fmt: skip
        lines += _table(["policy", "tokens/s", "speedup", "est. agreement", "mean exit layer",
                         "TPOT p50 ms"], table)  # fmt: skip
        if len(group) > TOP_ROWS:
            lines.append(f"\n({len(group) - TOP_ROWS} more runs in results.parquet)")
        lines.append("")
    return lines


def _figure_section(run: RunData, fig_dir: Path, report_dir: Path) -> tuple[list[str], list[str]]:
    plans = []
    if run.sweep_rows:
        plans += [
            ("Speedup against λ, per exit rule", figures.speedup_vs_lambda, run.sweep_rows, "speedup_vs_lambda"),
            ("Quality against speedup (Pareto front per policy)", figures.quality_vs_speedup, run.sweep_rows, "quality_vs_speedup"),
            ("Throughput against offered load", figures.throughput_vs_load, run.sweep_rows, "throughput_vs_load"),
        ]  # fmt: skip
    if run.validation is not None:
        plans += [
            ("Simulated against measured (y = x)", figures.simulated_vs_measured, run.validation, "sim_vs_measured"),
            ("Exit-layer histograms, measured and simulated", figures.exit_histograms, run.validation.configurations, "exit_histograms"),
            ("TTFT and TPOT CDFs", figures.latency_cdfs, run.latencies, "latency_cdfs"),
        ]  # fmt: skip
    lines, notes = ["## Figures", ""], []
    for title, draw, rows, name in plans:
        path = draw(rows, fig_dir / f"{name}.png")
        if path is None:
            notes.append(f"figure '{title}' left out: its results hold nothing to draw")
            continue
        rel = os.path.relpath(path, report_dir)
        lines += [f"### {title}", "", f"![{title}]({rel})", ""]
    return lines, notes


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write report.md (and figures/) into out (default: run_dir); return its path."""
    run = load_run(run_dir)
    report_dir = Path(out) if out is not None else run.root
    fig_dir = report_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# eetb report: {run.root.name}", ""]
    sources = [f"sweep: `{run.sweep_dir}`" if run.sweep_dir else None,
               f"validation: `{run.validation_dir}`" if run.validation_dir else None]  # fmt: skip
    lines += ["Results read from " + ", ".join(s for s in sources if s) + ".", ""]
    if run.validation is not None:
        lines += _validation_section(run.validation)
    if run.sweep_rows:
        lines += _sweep_section(run.sweep_rows)
    fig_lines, fig_notes = _figure_section(run, fig_dir, report_dir)
    lines += fig_lines
    notes = [*run.notes, *fig_notes]
    if notes:
        lines += ["## Missing", "", *(f"- {n}" for n in notes), ""]
    return atomic.write_text(report_dir / "report.md", "\n".join(lines))
