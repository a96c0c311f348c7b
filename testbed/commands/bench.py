"""``eetb bench``: parse the options, run one suite of testbed.bench, print its lines."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from testbed.bench.early_exit import GRID_FILLS
from testbed.bench.options import BenchOptions
from testbed.builtin_model import resolve_model_dir
from testbed.commands.common import (
    ProgressLine,
    add_data_dir,
    add_device_args,
    add_model,
    guarded,
    parser,
)
from testbed.model.checkpoint import load_checkpoint

SUITES = ("throughput", "early-exit", "capture", "sim-speed", "fidelity", "validation", "vllm",
          "noise")  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    p = parser("bench", "Benchmarks: engine vs transformers throughput; early-exit grid.")
    add_model(p)
    add_data_dir(p)
    add_device_args(p)
    p.add_argument("--suite", choices=SUITES, default="throughput")
    p.add_argument("--trace", default=BenchOptions.trace, help="sim-speed: the trace")
    p.add_argument(
        "--sizes", default=BenchOptions.sizes, help="sim-speed: numbers of Azure requests"
    )
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder for the JSON")
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--rules", default=BenchOptions.rules)
    p.add_argument("--batchings", default=None,
                   help="early-exit: comma list of consensus, quorum, shrink, rebatch (default: all)")  # fmt: skip
    p.add_argument("--dataset", default=BenchOptions.dataset, help="early-exit: cnndm|xsum")
    p.add_argument("--points", default=None,
                   help="early-exit: RULE:λ:FIRST_LAYER,... instead of --rules' default points")  # fmt: skip
    p.add_argument("--rule", default=None, help="vllm: the early-exit rule (default hidden)")
    p.add_argument("--threshold", type=float, default=None, help="vllm: λ (default 0.9)")
    p.add_argument("--min-exit-layer", type=int, default=None,
                   help="vllm: first exit layer; capture: the sparse oracle's first exit point (default: half the depth)")  # fmt: skip
    p.add_argument("--exit-stride", type=int, default=None,
                   help="capture: layers between the sparse oracle's exit points (default 3)")  # fmt: skip
    p.add_argument("--fills", default=",".join(GRID_FILLS))
    p.add_argument("--workloads", default=None,
                   help="validation: comma list of demo, poisson-saturated, azure-scaled (default: all)")  # fmt: skip
    p.add_argument("--eos", choices=("stop", "ignore"), default=BenchOptions.eos,
                   help="validation: ignore runs every request to its output length, so only "
                        "timing is compared (default stop)")  # fmt: skip
    p.add_argument("--workload", default=None, help="noise: the workload (default: the demo's)")
    p.add_argument("--rounds", type=int, default=BenchOptions.rounds,
                   help="noise: interleaved rounds of every variant; validation: rounds of runs"
                        " per configuration")  # fmt: skip
    return p


def say(line: str) -> None:
    print(line, flush=True)


@guarded
def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    fields = {f.name for f in dataclasses.fields(BenchOptions)}
    opts = BenchOptions(**{k: v for k, v in vars(args).items() if k in fields})
    progress = ProgressLine(min_interval_s=0)
    if args.suite == "sim-speed":
        from testbed.bench import sim_speed

        sim_speed.run(opts, say)
        return 0
    if args.suite == "noise":
        from testbed.bench import noise

        noise.run(opts, say, progress)
        return 0
    if args.suite == "validation":
        from testbed.bench import validation

        names = None if opts.workloads is None else opts.workloads.split(",")
        validation.run(
            opts.out,
            opts.data_dir,
            names,
            say=say,
            progress=progress,
            model=opts.model,
            repeats=opts.rounds,
            num_requests=opts.num_requests,
            eos=opts.eos,
        )
        return 0
    ckpt = load_checkpoint(resolve_model_dir(opts.model))
    if args.suite == "early-exit":
        from testbed.bench import early_exit

        early_exit.run(opts, ckpt, say, progress)
        return 0
    from testbed.bench import capture, fidelity, throughput, vllm_vs_native

    suite = {"throughput": throughput, "capture": capture, "fidelity": fidelity,
             "vllm": vllm_vs_native}[args.suite]  # fmt: skip
    suite.run(opts, ckpt, say)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
