"""``eetb demo``: calibrate → capture → sweep → validate → report, offline, on the built-in model."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from testbed.builtin_model import resolve_model_dir
from testbed.commands.common import ProgressLine, add_data_dir, guarded, parser
from testbed.demo import DemoConfig, demo_config, run_demo
from testbed.errors import ConfigError
from testbed.model.checkpoint import read_config


@guarded
def main(argv: list[str]) -> int:
    p = parser("demo", "The whole loop on the built-in model: capture, simulate, validate, report.")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="result folder")
    p.add_argument("--resume", action="store_true",
                   help="keep what an earlier run into --out finished and do the rest")  # fmt: skip
    p.add_argument("--workload", default=DemoConfig.workload,
                   help="the workload captured, simulated and validated (default: %(default)s)")  # fmt: skip
    p.add_argument("--higher-load", default=DemoConfig.higher_load,
                   help="a second workload, simulated only ('' for none; default: %(default)s)")  # fmt: skip
    p.add_argument("--calibration-workload", default=DemoConfig.calibration_workload,
                   help="the calibration runs' workload (another seed; default: %(default)s)")  # fmt: skip
    p.add_argument("--model", default=DemoConfig.model,
                   help="'builtin', a prepared known model (smollm2-135m) or a checkpoint")  # fmt: skip
    p.add_argument("--thresholds", default=None,
                   help=f"comma list of the grid's λ (default: {','.join(map(str, DemoConfig.thresholds))}; a known model's own)")  # fmt: skip
    p.add_argument("--min-exit-layer", type=int, default=None,
                   help=f"the grid's first exit layer (default: {DemoConfig.min_exit_layer}; a known model's own)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=DemoConfig.repeats,
                   help="validation rounds per policy (default: %(default)s)")  # fmt: skip
    add_data_dir(p)
    args = p.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()) and not args.resume:
        raise ConfigError(
            f"{args.out} is not empty: pass --resume to continue it, or another --out"
        )
    start = time.perf_counter()
    try:
        thresholds = (None if args.thresholds is None
                      else tuple(float(x) for x in args.thresholds.split(",")))  # fmt: skip
    except ValueError as exc:
        raise ConfigError(f"--thresholds {args.thresholds!r}: not a comma list of numbers") from exc
    if args.repeats < 1:
        raise ConfigError("--repeats must be at least 1")
    num_layers = read_config(resolve_model_dir(args.model)).num_hidden_layers
    cfg = demo_config(args.model, workload=args.workload, higher_load=args.higher_load,
                      calibration_workload=args.calibration_workload, thresholds=thresholds,
                      min_exit_layer=args.min_exit_layer, repeats=args.repeats)  # fmt: skip
    if not 1 <= cfg.min_exit_layer < num_layers:
        raise ConfigError(f"--min-exit-layer {cfg.min_exit_layer} is outside 1..{num_layers - 1}")
    path = run_demo(cfg, args.out, data_dir=args.data_dir,
                    progress=ProgressLine(min_interval_s=0))  # fmt: skip
    print(path.read_text())
    print(f"wrote {path} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
