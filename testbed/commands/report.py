"""``eetb report RUN_DIR``: report.md with figures and tables from a sweep and/or validation."""

from __future__ import annotations

import sys
from pathlib import Path

from analysis.report import write_report
from testbed.commands.common import guarded, parser


@guarded
def main(argv: list[str]) -> int:
    p = parser("report", "Write report.md (tables, PNG figures) from a run folder's result files.")
    p.add_argument("run_dir", type=Path,
                   help="a sweep or validation output folder, or one holding both (eetb demo)")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="where to write (default: RUN_DIR)")
    args = p.parse_args(argv)
    path = write_report(args.run_dir, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
