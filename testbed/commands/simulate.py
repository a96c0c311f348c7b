"""``eetb simulate``: one simulated run (SimPy replay of a trace); prints a table, writes JSON."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from testbed.commands.common import add_data_dir, add_policy_args, guarded, parser, policy_from_args
from testbed.core import SchedulerConfig
from testbed.runinfo import to_jsonable, write_run_info
from testbed.sim.simulator import SimulationConfig, simulate


@guarded
def main(argv: list[str]) -> int:
    p = parser("simulate", "Simulate a policy on a workload by replaying a trace (DESIGN §7).")
    add_data_dir(p)
    add_policy_args(p)
    p.add_argument("--trace", required=True, help="capture directory (oracle for any rule and λ)")
    p.add_argument("--workload", required=True, metavar="KIND:ARGS")
    p.add_argument("--cost-model", default="roofline:H100",
                   help="roofline:GPU[:MODEL] | fitted:CAPTURE_DIR | profile:CSV")  # fmt: skip
    p.add_argument("--max-num-seqs", type=int, default=SchedulerConfig.max_num_seqs)
    p.add_argument(
        "--max-num-batched-tokens", type=int, default=SchedulerConfig.max_num_batched_tokens
    )
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output (default: the cost model's context)")  # fmt: skip
    p.add_argument("--num-kv-blocks", type=int, default=None,
                   help="K/V blocks (default: with a fitted cost model the engine's own for "
                   "the trace, else 4096)")  # fmt: skip
    p.add_argument("--block-size", type=int, default=SimulationConfig.block_size)
    p.add_argument("--allow-partial", action="store_true",
                   help="replay an interrupted capture (its finished requests)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="folder for result.json and run.json")
    args = p.parse_args(argv)
    cfg = SimulationConfig(
        trace=args.trace, workload=args.workload, policy=policy_from_args(args),
        cost_model=args.cost_model,
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs,
                                  max_num_batched_tokens=args.max_num_batched_tokens),
        max_model_len=args.max_model_len,
        block_size=args.block_size, num_kv_blocks=args.num_kv_blocks, seed=args.seed,
        data_dir=args.data_dir, allow_partial=args.allow_partial,
    )  # fmt: skip
    start = time.perf_counter()
    result = simulate(cfg)
    wall_s = time.perf_counter() - start
    clip = result.clip
    if clip.num_requests_clipped:  # the answer holds for the clipped lengths, not the asked ones
        print(f"note: {clip.num_requests_clipped} of {clip.num_requests} requests clipped to "
              f"max_model_len {result.config.max_model_len} ({clip.num_prompts_clipped} prompts, "
              f"{clip.num_outputs_clipped} outputs shortened)", file=sys.stderr)  # fmt: skip
    print(result.metrics.table())
    print(f"simulated {result.metrics.num_requests} requests in {wall_s:.2f} s wall "
          f"({result.metrics.num_requests / wall_s:,.0f} requests/s); rejected {result.num_rejected}; "
          f"{result.config.num_kv_blocks} K/V blocks of {result.config.block_size} tokens, "
          f"max_model_len {result.config.max_model_len}")  # fmt: skip
    if args.out is not None:
        write_run_info(args.out, cfg, seed=cfg.seed, wall_s=wall_s)
        record = {"config": to_jsonable(result.config), "metrics": result.metrics.to_dict(),
                  "num_rejected": result.num_rejected, "clip": to_jsonable(clip)}  # fmt: skip
        (args.out / "result.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
