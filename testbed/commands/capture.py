"""``eetb capture``: run a workload on the native engine or vLLM; write an oracle or live trace."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from testbed.builtin_model import resolve_model_dir
from testbed.capture_records import CAPTURE_MODES, CaptureConfig, EngineConfig
from testbed.commands.common import (
    ProgressLine,
    add_engine_args,
    guarded,
    parser,
    policy_from_args,
)
from testbed.core import SchedulerConfig
from testbed.datasets import FILES
from testbed.engine.capture import build_requests, run_capture
from testbed.errors import ConfigError
from testbed.model.checkpoint import load_checkpoint
from testbed.vllm_backend.options import check_supported

ENGINES = ("native", "vllm")


@guarded
def main(argv: list[str]) -> int:
    p = parser("capture", "Capture a trace (DESIGN §6) from a run of the native engine or vLLM.")
    add_engine_args(p)
    p.add_argument("--workload", required=True, metavar="KIND:ARGS",
                   help="e.g. poisson:rate=4,n=32,prompt=64-256,output=64 or azure:path=FILE,n=100,scale=0.1")  # fmt: skip
    p.add_argument("--dataset", default="cnndm",
                   help=f"prompt text source: {', '.join(FILES)} or 'synthetic' (random tokens) or 'self' (text the model samples)")  # fmt: skip
    p.add_argument("--mode", choices=CAPTURE_MODES, default="oracle",
                   help="oracle: full depth, every signal at the exit points --min-exit-layer and --exit-stride give (default: every layer; fewer is cheaper); live: what the policy did")  # fmt: skip
    p.add_argument("--out", required=True, type=Path, help="capture directory to create")
    p.add_argument("--profile", action="store_true", help="record per-layer timings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--engine", choices=ENGINES, default="native",
                   help="vllm: the early-exit model as a vLLM plugin (docs/vllm.md)")  # fmt: skip
    args = p.parse_args(argv)
    if args.engine == "vllm":
        check_supported(policy_from_args(args))
    if args.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "--engine vllm needs vLLM installed (pip install -e '.[vllm]'; docs/vllm.md)"
        )
    model_dir = resolve_model_dir(args.model)
    ckpt = load_checkpoint(model_dir)
    requests, clipped = build_requests(
        args.workload, args.dataset, ckpt, seed=args.seed, data_dir=args.data_dir
    )
    if clipped:
        print(f"clipped {clipped} request(s) to the model's limits", file=sys.stderr)
    cfg = CaptureConfig(
        mode=args.mode,
        engine=EngineConfig(
            policy=policy_from_args(args),
            scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs),
            device=args.device,
            dtype=args.dtype,
        ),  # fmt: skip
        profile_layers=args.profile,
        workload=args.workload,
        seed=args.seed,
    )
    progress = ProgressLine()
    done = []

    def on_finish(_out) -> None:
        done.append(1)
        progress("capture", len(done), len(requests))

    if args.engine == "vllm":
        # vLLM is optional: its module is imported only when asked for
        from testbed.vllm_backend.capture import run_vllm_capture  # noqa: PLC0415

        run_vllm_capture(model_dir, requests, cfg, args.out, on_finish=on_finish)
    else:
        run_capture(ckpt, requests, cfg, args.out, on_finish=on_finish)
    layers = cfg.recorded_layers(ckpt.config.num_hidden_layers)
    recorded = "" if layers is None else f", signals at layers {_layer_span(layers)}"
    print(f"wrote {args.out} ({len(requests)} requests, mode {args.mode}, engine {args.engine}"
          f"{recorded})")  # fmt: skip
    return 0


def _layer_span(layers: list[int]) -> str:
    if layers == list(range(1, len(layers) + 1)):
        return f"1-{len(layers)} (all)"
    return ", ".join(map(str, layers))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
