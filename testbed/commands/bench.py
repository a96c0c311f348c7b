"""``eetb bench``: side-by-side benchmarks of the native engine; prints a table, writes JSON."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

from testbed.bench import (
    ThroughputConfig,
    kv_only_cost_fraction,
    lm_head_cost_layers,
    random_prompts,
    relative_to_full,
    run_engine,
    run_policy,
    run_transformers,
    run_vllm,
)
from testbed.builtin_model import resolve_model_dir
from testbed.capture_records import CaptureConfig, CaptureRequest, EngineConfig
from testbed.commands.common import (
    ProgressLine,
    add_data_dir,
    add_device_args,
    add_model,
    guarded,
    parser,
)
from testbed.core import SchedulerConfig
from testbed.core.policy_set import PolicyConfig
from testbed.datasets import load_summaries
from testbed.engine.capture import build_requests, run_capture
from testbed.engine.engine import LLMEngine
from testbed.engine.sampler import SamplingParams
from testbed.errors import ConfigError
from testbed.model.checkpoint import load_checkpoint
from testbed.runinfo import to_jsonable, write_run_info
from testbed.sim.cost_model import build_cost_model
from testbed.sim.metrics import compute_metrics
from testbed.sim.simulator import SimulationConfig, simulate
from testbed.trace import read_capture
from testbed.validate.measured import live_records
from testbed.workload_files import read_azure_csv, resolve_path

# the early-exit grid: (batching, params) × rule × λ; each rule's λ spans "rarely" to "often"
GRID_BATCHING = (
    ("consensus", ()),
    ("quorum", (("fraction", 0.75),)),
    ("shrink", ()),
    ("rebatch", ()),
)
# per rule: (λ, first exit layer as a fraction of the depth); a model's first layers agree with
# the last rarely (the built-in model's about half the tokens), so most points start exiting at
# half or five eighths of the depth (layers 4 and 5 of the built-in model's 8)
GRID_THRESHOLDS = {
    "hidden": ((0.98, 0.0), (0.95, 0.0), (0.95, 0.5), (0.9, 0.5), (0.9, 0.625), (0.85, 0.625)),
    "softmax": ((0.7, 0.0), (0.5, 0.5)),
    "classifier": ((0.9, 0.0), (0.7, 0.5), (0.5, 0.625)),
}
GRID_FILLS = ("copy",)
ARTICLE_CHARS = 1200  # about 250-300 tokens: the built-in model was trained on 400-token heads


@guarded
def main(argv: list[str]) -> int:
    p = parser("bench", "Benchmarks: engine vs transformers throughput; early-exit grid.")
    add_model(p)
    add_data_dir(p)
    add_device_args(p)
    p.add_argument(
        "--suite",
        choices=(
            "throughput",
            "early-exit",
            "capture",
            "sim-speed",
            "fidelity",
            "validation",
            "vllm",
        ),
        default="throughput",
    )
    p.add_argument("--trace", default="traces/samples/oracle_cnndm", help="sim-speed: the trace")
    p.add_argument(
        "--sizes", default="1000,19366,100000", help="sim-speed: numbers of Azure requests"
    )
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder for the JSON")
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--rules", default="hidden,softmax,classifier")
    p.add_argument("--batchings", default=None,
                   help="early-exit: comma list of consensus, quorum, shrink, rebatch (default: all)")  # fmt: skip
    p.add_argument("--dataset", default="cnndm", help="early-exit: cnndm|xsum")
    p.add_argument("--points", default=None,
                   help="early-exit: RULE:λ:FIRST_LAYER,... instead of --rules' default points")  # fmt: skip
    p.add_argument("--rule", default=None, help="vllm: the early-exit rule (default hidden)")
    p.add_argument("--threshold", type=float, default=None, help="vllm: λ (default 0.9)")
    p.add_argument("--min-exit-layer", type=int, default=None,
                   help="vllm: first exit layer (default: half the depth)")  # fmt: skip
    p.add_argument("--fills", default=",".join(GRID_FILLS))
    p.add_argument(
        "--workloads",
        default=None,
        help="validation: comma list of demo, poisson-saturated, azure-scaled (default: all)",
    )
    args = p.parse_args(argv)
    if args.suite == "sim-speed":
        return _sim_speed(args)
    if args.suite == "validation":
        from testbed.commands import bench_validation

        names = None if args.workloads is None else args.workloads.split(",")
        return bench_validation.run(args.out, args.data_dir, names)
    if args.suite == "fidelity":
        return _fidelity(args, load_checkpoint(resolve_model_dir(args.model)))
    ckpt = load_checkpoint(resolve_model_dir(args.model))
    if args.suite == "throughput":
        return _throughput(args, ckpt)
    if args.suite == "capture":
        return _capture(args, ckpt)
    if args.suite == "vllm":
        return _vllm(args, ckpt)
    return _early_exit(args, ckpt)


# vLLM early exit vs vLLM full depth, and vLLM vs the native engine, both at full depth; the
# first exit layer is half the depth unless --min-exit-layer says otherwise (4 of the built-in 8)
VLLM_EARLY_EXIT = PolicyConfig(batching="consensus", exit_rule="hidden", threshold=0.9)


def _vllm_policy(args, num_layers: int) -> PolicyConfig:
    return dataclasses.replace(
        VLLM_EARLY_EXIT,
        exit_rule=args.rule or VLLM_EARLY_EXIT.exit_rule,
        threshold=VLLM_EARLY_EXIT.threshold if args.threshold is None else args.threshold,
        min_exit_layer=args.min_exit_layer or max(1, num_layers // 2),
    )


def _vllm(args, ckpt) -> int:
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("--suite vllm needs vLLM installed (docs/vllm.md)")
    # vLLM is optional: the suite's module imports it
    from testbed.vllm_backend.bench import run_vllm_policy  # noqa: PLC0415

    cfg = ThroughputConfig(num_requests=args.num_requests or 32, max_prompt_tokens=256,
                           max_new_tokens=args.max_new_tokens or 64, max_num_seqs=32,
                           device=args.device, dtype=args.dtype)  # fmt: skip
    prompts = random_prompts(cfg, ckpt.config.vocab_size)
    early_policy = _vllm_policy(args, ckpt.config.num_hidden_layers)
    native = run_engine(ckpt, prompts, cfg)
    full, early = (
        run_vllm_policy(
            ckpt.path,
            prompts,
            policy,
            max_new_tokens=cfg.max_new_tokens,
            max_num_seqs=cfg.max_num_seqs,
        )  # fmt: skip
        for policy in (PolicyConfig(), early_policy)
    )
    print(f"{'system':40s} {'tokens':>7s} {'wall s':>7s} {'tok/s':>7s} {'exit':>5s} {'layers':>6s}")
    print(f"{native.system:40s} {native.num_output_tokens:7d} {native.wall_s:7.2f} "
          f"{native.tokens_per_s:7.1f} {'':>5s} {ckpt.config.num_hidden_layers:6d}")  # fmt: skip
    for r in (full, early):
        print(f"{r.label:40s} {r.num_output_tokens:7d} {r.wall_s:7.2f} {r.tokens_per_s:7.1f} "
              f"{r.mean_exit_layer:5.2f} {r.mean_executed_layers:6.2f}")  # fmt: skip
    ratio_ee = early.tokens_per_s / full.tokens_per_s
    ratio_native = full.tokens_per_s / native.tokens_per_s
    print(
        f"vLLM early exit / vLLM full: {ratio_ee:.2f}x throughput, "
        f"{early.mean_executed_layers:.2f} of {full.mean_executed_layers:.2f} layers per token"
    )
    print(f"vLLM full / native full: {ratio_native:.2f}x throughput")  # fmt: skip
    write_run_info(args.out, cfg, seed=cfg.seed, suite="vllm", policy=early_policy.label(),
                   ratio_early_exit=ratio_ee, ratio_vllm_native=ratio_native)  # fmt: skip
    return 0


def _throughput(args, ckpt) -> int:
    cfg = ThroughputConfig(device=args.device, dtype=args.dtype)
    if args.num_requests:
        cfg = dataclasses.replace(cfg, num_requests=args.num_requests)
    if args.max_new_tokens:
        cfg = dataclasses.replace(cfg, max_new_tokens=args.max_new_tokens)
    prompts = random_prompts(cfg, ckpt.config.vocab_size)
    rows = [run_transformers(ckpt, prompts, cfg), run_engine(ckpt, prompts, cfg)]
    vllm_row = run_vllm(ckpt, prompts, cfg)
    if vllm_row is not None:
        rows.append(vllm_row)
    base = rows[0].tokens_per_s
    print(f"{'system':28s} {'tokens':>8s} {'wall s':>8s} {'tok/s':>8s} {'vs transformers':>16s}")
    for r in rows:
        print(f"{r.system:28s} {r.num_output_tokens:8d} {r.wall_s:8.2f} {r.tokens_per_s:8.1f} "
              f"{r.tokens_per_s / base:15.2f}x")  # fmt: skip
    write_run_info(args.out, cfg, seed=cfg.seed, suite="throughput")
    record = [dict(to_jsonable(r), tokens_per_s=r.tokens_per_s) for r in rows]
    (args.out / "throughput.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


def parse_points(text: str) -> list[tuple[str, float, int]]:
    """'RULE:λ:FIRST_LAYER,...' → (rule, λ, first exit layer) per grid point."""
    points = []
    for item in text.split(","):
        parts = item.split(":")
        try:
            rule, lam, layer = parts[0], float(parts[1]), int(parts[2])
        except (IndexError, ValueError) as exc:
            raise ConfigError(f"--points: {item!r} is not RULE:λ:FIRST_LAYER") from exc
        points.append((rule, lam, layer))
    return points


def _grid(
    rules: list[str],
    fills: list[str],
    num_layers: int,
    batchings: list[str] | None = None,
    points: list[tuple[str, float, int]] | None = None,
) -> list[PolicyConfig]:
    """`full`, then batching × fill × point; the points default to GRID_THRESHOLDS of rules."""
    if points is None:
        unknown = [r for r in rules if r not in GRID_THRESHOLDS]
        if unknown:
            raise ConfigError(
                f"--rules: unknown rule {unknown[0]!r} (known: {', '.join(GRID_THRESHOLDS)})"
            )
        points = [(rule, lam, max(1, round(depth * num_layers)))
                  for rule in rules for lam, depth in GRID_THRESHOLDS[rule]]  # fmt: skip
    grid = [PolicyConfig()]
    chosen = [b for b in GRID_BATCHING if batchings is None or b[0] in batchings]
    for (batching, params), fill in itertools.product(chosen, fills):
        for rule, lam, min_layer in points:
            grid.append(PolicyConfig(batching=batching, batching_params=params, exit_rule=rule,
                                     threshold=lam, min_exit_layer=min_layer, kv_fill=fill))  # fmt: skip
    return grid


def _early_exit(args, ckpt) -> int:
    n = args.num_requests or 32
    examples = load_summaries(args.dataset, "eval", args.data_dir)[:n]
    prompts = [ckpt.prompt.summary_request(ex.article[:ARTICLE_CHARS], args.dataset)
               for ex in examples]  # fmt: skip
    params = SamplingParams(max_tokens=args.max_new_tokens or 64)
    batchings = None if args.batchings is None else args.batchings.split(",")
    points = None if args.points is None else parse_points(args.points)
    grid = _grid(args.rules.split(","), args.fills.split(","), ckpt.config.num_hidden_layers,
                 batchings, points)  # fmt: skip
    progress = ProgressLine(min_interval_s=0)
    rows, outs = [], []
    references = [ex.reference for ex in examples]
    # `full` runs first and again last; its faster run is the baseline, so a noisy neighbour
    # during one of them cannot inflate every speedup
    for i, policy in enumerate([*grid, grid[0]]):
        row, out = run_policy(ckpt, prompts, references, policy, params, n,
                              device=args.device, dtype=args.dtype)  # fmt: skip
        rows.append(row)
        outs.append(out)
        progress("early-exit", i + 1, len(grid) + 1, policy.label())
    last, last_out = rows.pop(), outs.pop()
    if last.wall_s < rows[0].wall_s:
        rows[0], outs[0] = last, last_out
    rows = relative_to_full(
        rows, outs, kv_only_cost_fraction(ckpt.config), lm_head_cost_layers(ckpt.config)
    )
    header = (f"{'configuration':44s} {'tok/s':>7s} {'speedup':>7s} {'ideal':>6s} {'ach/ideal':>9s} "
              f"{'layers':>6s} {'ROUGE-L':>7s} {'agree':>6s}")  # fmt: skip
    print(header)
    for r in rows:
        print(f"{r.label:44s} {r.tokens_per_s:7.1f} {r.speedup:6.2f}x {r.ideal_speedup:5.2f}x "
              f"{r.speedup / r.ideal_speedup:9.2f} {r.mean_exit_layer:6.2f} {r.rouge_l:7.4f} "
              f"{r.agreement:6.1%}")  # fmt: skip
    full_rouge = rows[0].rouge_l
    ok = [r for r in rows[1:] if r.rouge_l >= full_rouge - 0.01]
    if ok:
        best = max(ok, key=lambda r: r.speedup)
        print(f"best within 1 ROUGE-L point of full: {best.label} at {best.speedup:.2f}x "
              f"(ideal {best.ideal_speedup:.2f}x, achieved/ideal {best.speedup / best.ideal_speedup:.2f})")  # fmt: skip
    write_run_info(args.out, {"grid": [p.label() for p in grid]}, seed=0, suite="early-exit")
    (args.out / "early_exit.json").write_text(json.dumps(to_jsonable(rows), indent=2) + "\n")
    return 0


def _capture(args, ckpt) -> int:
    """Oracle capture against plain full-depth generation of the same requests, alternating."""
    cfg = ThroughputConfig(
        num_requests=args.num_requests or 32, max_prompt_tokens=256,
        max_new_tokens=args.max_new_tokens or 64,
    )  # fmt: skip
    prompts = random_prompts(cfg, ckpt.config.vocab_size)
    requests = [CaptureRequest(i, 0.0, tuple(p), cfg.max_new_tokens) for i, p in enumerate(prompts)]
    engine_cfg = EngineConfig(scheduler=SchedulerConfig(max_num_seqs=cfg.max_num_seqs),
                              device=args.device, dtype=args.dtype)  # fmt: skip
    times = {"plain": [], "oracle capture": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(3):
            start = time.perf_counter()
            LLMEngine(ckpt, engine_cfg).run(
                [
                    (0.0, r.prompt_token_ids, SamplingParams(max_tokens=r.max_tokens))
                    for r in requests
                ]
            )
            times["plain"].append(time.perf_counter() - start)
            start = time.perf_counter()
            run_capture(
                ckpt,
                requests,
                CaptureConfig(mode="oracle", engine=engine_cfg),
                Path(tmp) / f"c{rep}",
            )
            times["oracle capture"].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:16s} best {best[k]:6.2f} s   runs {', '.join(f'{x:.2f}' for x in v)}")
    ratio = best["oracle capture"] / best["plain"]
    print(f"oracle capture / plain full-depth generation: {ratio:.2f}x")
    write_run_info(args.out, cfg, seed=cfg.seed, suite="capture", times_s=times, ratio=ratio)
    return 0


AZURE_CONV = "azure_llm_trace_2023/AzureLLMInferenceTrace_conv.csv"


def _repeated_azure_csv(source: Path, num_requests: int, out: Path) -> Path:
    """The Azure hour repeated back to back until it holds num_requests requests, as an Azure
    CSV with TIMESTAMP in seconds. Repeated, not time-scaled: the load (arrival rate, lengths)
    stays that of the real hour, so wall time should grow linearly with the request count."""
    hour = read_azure_csv(source)
    gap_s = hour[-1].arrival_s / max(len(hour) - 1, 1)  # one mean inter-arrival between copies
    period_s = hour[-1].arrival_s + gap_s
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for i in range(num_requests):
        spec = hour[i % len(hour)]
        arrival_s = spec.arrival_s + (i // len(hour)) * period_s
        lines.append(f"{arrival_s!r},{spec.num_prompt_tokens},{spec.num_output_tokens}")
    out.write_text("\n".join(lines) + "\n")
    return out


def _sim_speed(args) -> int:
    """Wall time of simulating N Azure conversation requests with exit replay (consensus,
    hidden λ=0.95 from layer 4) and the H100 roofline of Llama-2-7B, for each N in --sizes.
    Up to the hour's 19,366 requests: its first N; beyond: the hour repeated back to back."""
    policy = PolicyConfig(batching="consensus", threshold=0.95, min_exit_layer=4)
    source = resolve_path(AZURE_CONV, args.data_dir)
    num_in_hour = len(read_azure_csv(source))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in args.sizes.split(",")]:
            path, how = source, "first N of the hour"
            if n > num_in_hour:
                path = _repeated_azure_csv(source, n, Path(tmp) / f"azure_conv_x{n}.csv")
                how = f"hour repeated {n / num_in_hour:.2f}x"
            cfg = SimulationConfig(
                trace=args.trace, workload=f"azure:path={path},n={n}", policy=policy,
                cost_model="roofline:H100:llama-2-7b", data_dir=args.data_dir,
            )  # fmt: skip
            start = time.perf_counter()
            result = simulate(cfg)
            wall = time.perf_counter() - start
            m = result.metrics
            rows.append({"num_requests": n, "workload": how, "wall_s": wall,
                         "requests_per_wall_s": n / wall, "num_steps": m.num_steps,
                         "steps_per_wall_s": m.num_steps / wall,
                         "simulated_s": m.duration_s})  # fmt: skip
            print(f"{n:7d} requests ({how})  {m.num_steps:8d} steps  simulated "
                  f"{m.duration_s:8.1f} s  wall {wall:7.2f} s  {n / wall:7.0f} requests/s  "
                  f"{m.num_steps / wall:7.0f} steps/s", flush=True)  # fmt: skip
    write_run_info(
        args.out, {"sizes": args.sizes, "trace": args.trace}, seed=0, suite="sim-speed", rows=rows
    )
    return 0


FIDELITY_CALIBRATION = "poisson:rate=6,n=40,prompt=64-256,output=64"
FIDELITY_TARGETS = (
    "poisson:rate=3,n=40,prompt=128-384,output=48",
    "poisson:rate=12,n=48,prompt=64-192,output=64",
)


def _measured(capture_dir: Path):
    return compute_metrics(live_records(read_capture(capture_dir)), [])


def _fidelity(args, ckpt) -> int:
    """Fit `fitted` on an oracle and a live run of one workload; predict live runs of other
    workloads from their oracle traces; print the error of throughput and mean TPOT."""
    policy = PolicyConfig(batching="consensus", threshold=0.95, min_exit_layer=4)
    live = CaptureConfig(mode="live", engine=EngineConfig(policy=policy))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        calib, _ = build_requests(
            FIDELITY_CALIBRATION, "cnndm", ckpt, seed=1, data_dir=args.data_dir
        )
        run_capture(ckpt, calib, CaptureConfig(mode="oracle"), root / "calibration_oracle")
        run_capture(ckpt, calib, live, root / "calibration_live")
        fitted = f"fitted:{root / 'calibration_oracle'}+{root / 'calibration_live'}"
        fit = build_cost_model(fitted)
        print(fit.report.table())
        for i, workload in enumerate(FIDELITY_TARGETS):
            reqs, _ = build_requests(workload, "cnndm", ckpt, seed=2, data_dir=args.data_dir)
            run_capture(ckpt, reqs, CaptureConfig(mode="oracle"), root / f"oracle{i}")
            run_capture(ckpt, reqs, live, root / f"live{i}")
            measured = _measured(root / f"live{i}")
            sim = simulate(SimulationConfig(
                trace=str(root / f"oracle{i}"), workload=workload, policy=policy,
                cost_model=fitted, seed=2, data_dir=args.data_dir,
            ))  # fmt: skip
            p = sim.metrics
            for name, pred, real in (
                ("throughput tok/s", p.throughput_tokens_per_s, measured.throughput_tokens_per_s),
                ("mean TPOT ms", p.tpot_mean_s * 1e3, measured.tpot_mean_s * 1e3),
                ("mean TTFT ms", p.ttft_mean_s * 1e3, measured.ttft_mean_s * 1e3),
            ):
                rows.append({"workload": workload, "metric": name, "predicted": pred,
                             "measured": real, "error": pred / real - 1})  # fmt: skip
    print(f"{'workload':48s} {'metric':18s} {'predicted':>10s} {'measured':>10s} {'error':>7s}")
    for r in rows:
        print(f"{r['workload']:48s} {r['metric']:18s} {r['predicted']:10.2f} {r['measured']:10.2f} "
              f"{r['error']:+7.1%}")  # fmt: skip
    write_run_info(args.out, {"policy": policy.label(), "calibration": FIDELITY_CALIBRATION},
                   seed=1, suite="fidelity", rows=rows)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
