"""``eetb demo``: calibrate → capture → sweep → validate → report, offline, on the built-in model."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from testbed.commands.common import ProgressLine, add_data_dir, guarded, parser
from testbed.demo import DemoConfig, run_demo
from testbed.errors import ConfigError


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
    add_data_dir(p)
    args = p.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()) and not args.resume:
        raise ConfigError(
            f"{args.out} is not empty: pass --resume to continue it, or another --out"
        )
    start = time.perf_counter()
    cfg = DemoConfig(workload=args.workload, higher_load=args.higher_load,
                     calibration_workload=args.calibration_workload)  # fmt: skip
    path = run_demo(cfg, args.out, data_dir=args.data_dir,
                    progress=ProgressLine(min_interval_s=0))  # fmt: skip
    print(path.read_text())
    print(f"wrote {path} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
